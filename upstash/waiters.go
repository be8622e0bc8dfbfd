package upstash

// waiters serves GET /v2/waiters/{eventId}: the waiters waiting on the
// event id now, oldest first, as Upstash's Waiter (see waiterJSON).
func (a *api) waiters(c *call) (any, error) {
	ws, err := a.eng.ActiveWaiters(c.Context(), c.PathValue("eventId"))
	if err != nil {
		return nil, err
	}
	out := make([]waiterJSON, 0, len(ws))
	for _, w := range ws {
		out = append(out, waiterOf(w))
	}
	return out, nil
}
