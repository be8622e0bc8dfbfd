package upstash

import (
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"time"

	"rendezvous/engine"
)

// cancelOne serves DELETE /v2/workflows/runs/{workflowRunId} (what
// context.cancel calls, with ?cancel=true): 404 for an unknown run, 400
// for one that has already ended.
func (a *api) cancelOne(c *call) (any, error) {
	if _, err := a.eng.Cancel(c.Context(), c.PathValue("workflowRunId")); err != nil {
		return nil, err
	}
	return cancelledJSON{Cancelled: 1}, nil
}

type cancelledJSON struct {
	Cancelled int `json:"cancelled"`
}

// defaultCancelCount is the npm client's own default.
const defaultCancelCount = 100

// cancelMany serves DELETE /v2/workflows/runs, Upstash's bulk cancel, with
// the filters in the query string as the npm client sends them:
// workflowRunIds (repeated; other filters are then ignored, as Upstash
// does), label (repeated: any of them), fromDate and toDate (Unix ms,
// inclusive), count (default 100); with no filter, every started run (up to
// count). Filters this service cannot apply are refused rather than
// ignored: a cancel must not reach runs the caller did not mean.
func (a *api) cancelMany(c *call) (any, error) {
	if err := noBody(c); err != nil {
		return nil, err
	}
	q, err := queryOf(c)
	if err != nil {
		return nil, err
	}
	p := engine.CancelRunsParams{RunIDs: q["workflowRunIds"]}
	if len(p.RunIDs) > 0 {
		if err := c.charge(len(p.RunIDs)); err != nil {
			return nil, err
		}
		n, err := a.eng.CancelRuns(c.Context(), p)
		if err != nil {
			return nil, err
		}
		return cancelledJSON{Cancelled: n}, nil
	}
	if err := onlyParams(q, "label", "fromDate", "toDate", "count", "cursor", "workflowUrl", "workflowUrlExactMatch"); err != nil {
		return nil, err
	}
	// The client sends workflowUrlStartingWith as workflowUrl, and
	// workflowUrl as workflowUrl with workflowUrlExactMatch=true.
	u, hasURL, err := single(q, "workflowUrl")
	if err != nil {
		return nil, err
	}
	exact, _, err := single(q, "workflowUrlExactMatch")
	if err != nil {
		return nil, err
	}
	switch {
	case exact != "" && exact != "true" && exact != "false":
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "workflowUrlExactMatch must be true or false, got %q", exact)
	case exact != "" && !hasURL:
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "workflowUrlExactMatch needs workflowUrl")
	case hasURL && u == "":
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "workflowUrl must not be empty")
	case hasURL && exact == "true":
		p.DispatchURL = &u
	case hasURL:
		p.DispatchURLPrefix = &u
	}
	if q.Get("cursor") != "" {
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "cancel takes no cursor: call it again to cancel more")
	}
	if err := c.charge(1); err != nil {
		return nil, err
	}
	p.Labels = q["label"]
	if p.CreatedFrom, err = millisParam(q, "fromDate"); err != nil {
		return nil, err
	}
	if p.CreatedTo, err = millisParam(q, "toDate"); err != nil {
		return nil, err
	}
	if p.Count, err = intParam(q, "count", defaultCancelCount); err != nil {
		return nil, err
	}
	n, err := a.eng.CancelRuns(c.Context(), p)
	if err != nil {
		return nil, err
	}
	return cancelledJSON{Cancelled: n}, nil
}

// noBody refuses a body: the filters of this API's version are query
// parameters, and a body of an older client's version would otherwise be
// ignored (and its filter with it).
func noBody(c *call) error {
	b, err := io.ReadAll(io.LimitReader(c.Body, 1))
	if err != nil {
		return err
	}
	if len(b) > 0 {
		return apiErrorf(http.StatusBadRequest, codeBadUserInput, "this endpoint takes its filters in the query string, not in a body")
	}
	return nil
}

// queryOf parses the query string; a malformed one is refused rather than
// read in part (url.Values drops what it cannot parse, filters included).
func queryOf(c *call) (url.Values, error) {
	q, err := url.ParseQuery(c.URL.RawQuery)
	if err != nil {
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "the query string is malformed: %s", err.Error())
	}
	return q, nil
}

// onlyParams refuses query parameters other than allowed, naming the first.
func onlyParams(q url.Values, allowed ...string) error {
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if !slices.Contains(allowed, k) {
			return apiErrorf(http.StatusBadRequest, codeBadUserInput, "the filter %q is not supported by this service", k)
		}
	}
	return nil
}

// millisParam reads a Unix-milliseconds parameter; nil when absent.
func millisParam(q url.Values, name string) (*time.Time, error) {
	v, ok, err := single(q, name)
	if err != nil || !ok {
		return nil, err
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms < 0 || ms > 253402300799999 { // up to year 9999
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "%s must be a Unix time in milliseconds, got %q", name, v)
	}
	t := time.UnixMilli(ms).UTC()
	return &t, nil
}

// intParam reads a positive integer parameter, def when absent.
func intParam(q url.Values, name string, def int) (int, error) {
	v, ok, err := single(q, name)
	if err != nil || !ok {
		return def, err
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		return 0, apiErrorf(http.StatusBadRequest, codeBadUserInput, "%s must be a positive integer, got %q", name, v)
	}
	return n, nil
}

// single reads a parameter that may be given at most once.
func single(q url.Values, name string) (string, bool, error) {
	vs := q[name]
	switch len(vs) {
	case 0:
		return "", false, nil
	case 1:
		return vs[0], true, nil
	}
	return "", false, apiErrorf(http.StatusBadRequest, codeBadUserInput, "%s is given %d times; once at most", name, len(vs))
}
