package engine

// QueuedNotifies is how many targeted notifies wait for a group.
func (e *Engine) QueuedNotifies() int {
	e.groups.mu.Lock()
	defer e.groups.mu.Unlock()
	return len(e.groups.queue)
}
