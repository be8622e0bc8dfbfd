package main

// The client process: this binary run with -client. It holds every client
// connection (so the server process holds only the server's), reads one JSON
// command per line on stdin, and answers each with one JSON line on stdout.
// Timings are taken here, on both ends of a measured path: a notify is sent
// and the subscription's message is received in this process.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// GraphQL documents the clients send.
const (
	qWait            = `subscription($e: String!) { waitForEvent(eventId: $e) { eventId eventData waiterId messageId } }`
	qNotifyTargeted  = `mutation($e: String!, $r: ID, $d: JSON) { notify(eventId: $e, workflowRunId: $r, eventData: $d) { lookback { id } } }`
	qNotifyBroadcast = `mutation($e: String!, $d: JSON) { notify(eventId: $e, eventData: $d) { notifyResponse { messageId } } }`
	qTrigger         = `mutation($r: ID) { trigger(workflowRunId: $r) { workflowRunId } }`
	qTypename        = `{ __typename }`
)

// eventData is what every notify carries (about 100 bytes, like the
// baseline rows).
var eventData = json.RawMessage(`{"order":12345,"status":"paid","amount":42.5,"note":"benchmark event data, about a hundred bytes"}`)

// command is one instruction to the client process.
type command struct {
	Op       string `json:"op"`
	Set      string `json:"set,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
	// subscribe: N subscriptions, PerConn per websocket, on event ids
	// Prefix+i (or all on Prefix when SameEvent).
	N         int    `json:"n,omitempty"`
	PerConn   int    `json:"perConn,omitempty"`
	Prefix    string `json:"prefix,omitempty"`
	SameEvent bool   `json:"sameEvent,omitempty"`
	// trigger, load: Clients × Runs runs named runID(Prefix, client, k);
	// load notifies them on EventID for Duration, or Count times per client.
	Clients  int           `json:"clients,omitempty"`
	Runs     int           `json:"runs,omitempty"`
	EventID  string        `json:"eventId,omitempty"`
	Count    int           `json:"count,omitempty"`
	Duration time.Duration `json:"duration,omitempty"`
	// deliver: notifies per second, one per subscription of Set.
	Rate float64 `json:"rate,omitempty"`
	// psubscribe: the peer's publish API, where deliver and fanout publish.
	API string `json:"api,omitempty"`
}

// reply answers a command.
type reply struct {
	Err        string        `json:"err,omitempty"`
	OK         int           `json:"ok"`
	Errors     int           `json:"errors"`
	FirstError string        `json:"firstError,omitempty"`
	Missing    int           `json:"missing"`
	Elapsed    time.Duration `json:"elapsed"`
	Lat        latency       `json:"lat"`
	// Retried: subscriptions refused with SERVICE_UNAVAILABLE and sent again.
	Retried int `json:"retried,omitempty"`
	// Resp: deliver: the notifies' own response times.
	Resp latency `json:"resp"`
	// fanout: from sending the notify to the first and the last
	// subscriber's message, and the notify's own response time.
	First      time.Duration `json:"first"`
	Last       time.Duration `json:"last"`
	NotifyTook time.Duration `json:"notifyTook"`
	// CPU is the client process's CPU time so far.
	CPU time.Duration `json:"cpu"`
}

// runID names benchmark runs (the service stores them as wfr_<id>).
func runID(prefix string, client, k int) string {
	return prefix + strconv.Itoa(client) + "-" + strconv.Itoa(k)
}

// ---- the client process

// maxPosts bounds the client process's HTTP requests in flight to one server.
const maxPosts = 2000

type clientProc struct {
	dialer *rotatingDialer
	hc     *http.Client // POSTs
	wsc    *http.Client // websocket upgrades
	sets   map[string]*subSet
}

func newClientProc() *clientProc {
	d := newRotatingDialer()
	p := &clientProc{dialer: d, hc: newHTTPClient(d, 256), wsc: newHTTPClient(d, 0), sets: map[string]*subSet{}}
	// At most maxPosts requests in flight: beside 15,000 websockets, an
	// open-loop sender facing a slow server would otherwise open a
	// connection per waiting notify until this process, and the server's,
	// run out of file descriptors (20,000 here). A notify that waits for a
	// connection waits in the latency measured: its clock starts when it
	// is due.
	p.hc.Transport.(*http.Transport).MaxConnsPerHost = maxPosts
	p.wsc.Timeout = 0
	return p
}

func runClient() error {
	p := newClientProc()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	defer func() {
		for name := range p.sets {
			p.closeSet(name)
		}
	}()
	for in.Scan() {
		var cmd command
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			return fmt.Errorf("bad command %q: %w", in.Text(), err)
		}
		if cmd.Op == "exit" {
			return nil
		}
		r := p.handle(cmd)
		if err := out.Encode(r); err != nil {
			return err
		}
	}
	return in.Err()
}

func (p *clientProc) handle(cmd command) (r reply) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var err error
	switch cmd.Op {
	case "subscribe":
		r, err = p.subscribe(ctx, cmd)
	case "psubscribe":
		r, err = p.peerSubscribe(ctx, cmd)
	case "close":
		p.closeSet(cmd.Set)
	case "cpu":
	case "status":
		s := p.sets[cmd.Set]
		if s == nil {
			err = fmt.Errorf("no set %q", cmd.Set)
			break
		}
		r = s.status()
	case "trigger":
		r, err = p.trigger(ctx, cmd)
	case "load":
		r, err = p.load(ctx, cmd)
	case "deliver":
		r, err = p.deliver(ctx, cmd)
	case "fanout":
		r, err = p.fanout(ctx, cmd)
	default:
		err = fmt.Errorf("unknown op %q", cmd.Op)
	}
	if err != nil {
		r.Err = err.Error()
	}
	r.CPU = selfCPU()
	return r
}

// subSet is a set of subscriptions the process holds open.
type subSet struct {
	endpoint string
	n        int
	conns    []atomic.Pointer[wsConn]
	peer     *peerSet       // the peer's clients, when the set is on the peer
	sent     []atomic.Int64 // unix nanoseconds the notify for subscription i was sent
	recv     []atomic.Int64 // unix nanoseconds its message arrived
	received atomic.Int64
	errors   atomic.Int64
	// retried counts subscriptions the server refused with
	// SERVICE_UNAVAILABLE ("try again") that were sent again.
	retried  atomic.Int64
	resend   func(i, attempt int) // sends subscription i again (Rendezvous sets)
	firstErr atomic.Pointer[string]
	event    func(i int) string
}

func (s *subSet) fail(msg string) {
	s.errors.Add(1)
	s.firstErr.CompareAndSwap(nil, &msg)
}

// maxResend is how often a subscription refused with "try again" is sent again.
const maxResend = 5

// subID names subscription i's attempt (0: the first) on its websocket.
func subID(i, attempt int) string {
	if attempt == 0 {
		return strconv.Itoa(i)
	}
	return strconv.Itoa(i) + "." + strconv.Itoa(attempt)
}

func (s *subSet) on(id, typ string, at time.Time, payload json.RawMessage) {
	num, att, _ := strings.Cut(id, ".")
	i, err := strconv.Atoi(num)
	if err != nil || i < 0 || i >= s.n {
		return
	}
	attempt, _ := strconv.Atoi(att)
	switch typ {
	case "next":
		if bytes.Contains(payload, []byte(`"errors"`)) {
			// The server's retryable refusal (a database too busy to
			// register the waiter): subscribe again, as a client would.
			if bytes.Contains(payload, []byte(`"SERVICE_UNAVAILABLE"`)) && s.resend != nil && attempt < maxResend && s.recv[i].Load() == 0 {
				s.retried.Add(1)
				go s.resend(i, attempt+1)
				return
			}
			s.fail(fmt.Sprintf("subscription %d: %.300s", i, payload))
			return
		}
		if s.recv[i].CompareAndSwap(0, at.UnixNano()) {
			s.received.Add(1)
		}
	case "error":
		if bytes.Contains(payload, []byte(`"SERVICE_UNAVAILABLE"`)) && s.resend != nil && attempt < maxResend && s.recv[i].Load() == 0 {
			s.retried.Add(1)
			go s.resend(i, attempt+1)
			return
		}
		s.fail(fmt.Sprintf("subscription %d: %.300s", i, payload))
	}
}

func (s *subSet) status() reply {
	r := reply{OK: int(s.received.Load()), Errors: int(s.errors.Load()), Retried: int(s.retried.Load())}
	if e := s.firstErr.Load(); e != nil {
		r.FirstError = *e
	}
	return r
}

func (p *clientProc) subscribe(ctx context.Context, cmd command) (reply, error) {
	if _, dup := p.sets[cmd.Set]; dup {
		return reply{}, fmt.Errorf("set %q exists", cmd.Set)
	}
	per := max(cmd.PerConn, 1)
	s := &subSet{
		endpoint: cmd.Endpoint,
		n:        cmd.N,
		conns:    make([]atomic.Pointer[wsConn], (cmd.N+per-1)/per),
		sent:     make([]atomic.Int64, cmd.N),
		recv:     make([]atomic.Int64, cmd.N),
		event:    func(i int) string { return cmd.Prefix + strconv.Itoa(i) },
	}
	if cmd.SameEvent {
		s.event = func(int) string { return cmd.Prefix }
	}
	subMsg := func(i, attempt int) []byte {
		return mustJSON(map[string]any{"id": subID(i, attempt), "type": "subscribe", "payload": gqlRequest{Query: qWait, Variables: map[string]any{"e": s.event(i)}}})
	}
	s.resend = func(i, attempt int) {
		time.Sleep(time.Duration(attempt) * 100 * time.Millisecond)
		c := s.conns[i/per].Load()
		if c == nil {
			s.fail(fmt.Sprintf("subscription %d: no websocket to subscribe again on", i))
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.send(ctx, subMsg(i, attempt)); err != nil {
			s.fail(fmt.Sprintf("subscription %d, sent again: %v", i, err))
		}
	}
	p.sets[cmd.Set] = s
	start := time.Now()
	err := parallel(len(s.conns), 64, func(j int) error {
		var (
			c   *wsConn
			err error
		)
		for attempt := 1; ; attempt++ {
			dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			c, err = dialWS(dctx, p.wsc, cmd.Endpoint, s.on)
			cancel()
			if err == nil {
				break
			}
			if attempt == 5 {
				return fmt.Errorf("dial websocket %d: %w", j, err)
			}
			time.Sleep(time.Duration(attempt) * 200 * time.Millisecond)
		}
		s.conns[j].Store(c)
		for i := j * per; i < min(s.n, (j+1)*per); i++ {
			if err := c.send(ctx, subMsg(i, 0)); err != nil {
				return fmt.Errorf("subscribe %d: %w", i, err)
			}
		}
		return nil
	})
	r := s.status()
	r.Elapsed = time.Since(start)
	return r, err
}

func (p *clientProc) closeSet(name string) {
	s := p.sets[name]
	if s == nil {
		return
	}
	delete(p.sets, name)
	if s.peer != nil {
		s.peer.close()
		return
	}
	parallel(len(s.conns), 256, func(j int) error {
		if c := s.conns[j].Load(); c != nil {
			c.close()
		}
		return nil
	})
}

func (p *clientProc) trigger(ctx context.Context, cmd command) (reply, error) {
	var r reply
	var mu sync.Mutex
	start := time.Now()
	err := parallel(cmd.Clients*cmd.Runs, 16, func(i int) error {
		body := mustJSON(gqlRequest{Query: qTrigger, Variables: map[string]any{"r": runID(cmd.Prefix, i/cmd.Runs, i%cmd.Runs)}})
		_, err := post(ctx, p.hc, cmd.Endpoint, body)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			r.Errors++
			if r.FirstError == "" {
				r.FirstError = err.Error()
			}
			return err
		}
		r.OK++
		return nil
	})
	r.Elapsed = time.Since(start)
	return r, err
}

// load runs Clients closed-loop clients, each sending targeted notifies to
// its own runs in turn, and checks that each was stored as a lookback event.
func (p *clientProc) load(ctx context.Context, cmd command) (reply, error) {
	bodies := make([][][]byte, cmd.Clients)
	for c := range bodies {
		for k := range cmd.Runs {
			bodies[c] = append(bodies[c], mustJSON(gqlRequest{Query: qNotifyTargeted, Variables: map[string]any{
				"e": cmd.EventID, "r": runID(cmd.Prefix, c, k), "d": eventData,
			}}))
		}
	}
	var (
		ok, errs atomic.Int64
		firstErr atomic.Pointer[string]
		lat      = make([][]time.Duration, cmd.Clients)
		wg       sync.WaitGroup
		start    = make(chan struct{})
		stopAt   time.Time
	)
	for c := range cmd.Clients {
		lat[c] = make([]time.Duration, 0, max(cmd.Count, 1024))
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for n := 0; ; n++ {
				if cmd.Duration > 0 && !time.Now().Before(stopAt) || cmd.Duration == 0 && n >= cmd.Count {
					return
				}
				t := time.Now()
				data, err := post(ctx, p.hc, cmd.Endpoint, bodies[c][n%len(bodies[c])])
				d := time.Since(t)
				if err == nil {
					err = checkStored(data)
				}
				if err != nil {
					errs.Add(1)
					msg := err.Error()
					firstErr.CompareAndSwap(nil, &msg)
					if ctx.Err() != nil {
						return
					}
					continue
				}
				ok.Add(1)
				lat[c] = append(lat[c], d)
			}
		}()
	}
	t0 := time.Now()
	stopAt = t0.Add(cmd.Duration)
	close(start)
	wg.Wait()
	r := reply{OK: int(ok.Load()), Errors: int(errs.Load()), Elapsed: time.Since(t0), Lat: summarize(slices.Concat(lat...))}
	if e := firstErr.Load(); e != nil {
		r.FirstError = *e
	}
	return r, nil
}

type notifyData struct {
	Notify struct {
		NotifyResponse []json.RawMessage `json:"notifyResponse"`
		Lookback       *struct {
			ID string `json:"id"`
		} `json:"lookback"`
	} `json:"notify"`
}

func checkStored(data json.RawMessage) error {
	var d notifyData
	if err := json.Unmarshal(data, &d); err != nil {
		return err
	}
	if d.Notify.Lookback == nil {
		return errors.New("targeted notify was not stored as a lookback event")
	}
	return nil
}

func checkResolved(data json.RawMessage, want int) error {
	var d notifyData
	if err := json.Unmarshal(data, &d); err != nil {
		return err
	}
	if n := len(d.Notify.NotifyResponse); n != want {
		return fmt.Errorf("notify resolved %d waiters, want %d", n, want)
	}
	return nil
}

// warm opens the HTTP client's connections to the endpoint.
func (p *clientProc) warm(ctx context.Context, endpoint string) {
	body := mustJSON(gqlRequest{Query: qTypename})
	parallel(64, 32, func(int) error {
		_, err := post(ctx, p.hc, endpoint, body)
		return err
	})
}

// notifyBody is the broadcast notify (or, on the peer, the publish) that
// wakes the subscriptions on event.
func (s *subSet) notifyBody(event string) []byte {
	if s.peer != nil {
		return mustJSON(map[string]any{"channel": event, "data": eventData})
	}
	return mustJSON(gqlRequest{Query: qNotifyBroadcast, Variables: map[string]any{"e": event, "d": eventData}})
}

// notify sends a body made by notifyBody; on Rendezvous it checks that
// the notify resolved want waiters (the peer's publish says no such thing).
func (p *clientProc) notify(ctx context.Context, s *subSet, body []byte, want int) error {
	if s.peer != nil {
		return peerPublish(ctx, p.hc, s.peer.api, body)
	}
	data, err := post(ctx, p.hc, s.endpoint, body)
	if err == nil {
		err = checkResolved(data, want)
	}
	return err
}

// warmSet opens the HTTP client's connections to where the set's notifies go.
func (p *clientProc) warmSet(ctx context.Context, s *subSet) {
	if s.peer == nil {
		p.warm(ctx, s.endpoint)
		return
	}
	body := s.notifyBody("bench-warm-up")
	parallel(64, 32, func(int) error { return peerPublish(ctx, p.hc, s.peer.api, body) })
}

// deliver notifies the subscriptions of Set one by one at Rate per second
// (open loop: a slow response does not slow the sender) with broadcast
// notifies on their event ids, and measures from sending each notify to
// receiving its subscription's message.
func (p *clientProc) deliver(ctx context.Context, cmd command) (reply, error) {
	s := p.sets[cmd.Set]
	if s == nil {
		return reply{}, fmt.Errorf("no set %q", cmd.Set)
	}
	p.warmSet(ctx, s)
	bodies := make([][]byte, s.n)
	for i := range bodies {
		bodies[i] = s.notifyBody(s.event(i))
	}
	var (
		wg       sync.WaitGroup
		errs     atomic.Int64
		firstErr atomic.Pointer[string]
		answered = make([]time.Duration, s.n) // the notify's own response time
	)
	interval := time.Duration(float64(time.Second) / cmd.Rate)
	t0 := time.Now().Add(20 * time.Millisecond)
	for i := range s.n {
		time.Sleep(time.Until(t0.Add(time.Duration(i) * interval)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent := time.Now()
			s.sent[i].Store(sent.UnixNano())
			err := p.notify(ctx, s, bodies[i], 1)
			answered[i] = time.Since(sent)
			if err != nil {
				errs.Add(1)
				msg := err.Error()
				firstErr.CompareAndSwap(nil, &msg)
			}
		}()
	}
	wg.Wait()
	waitReceived(s, 10*time.Second)
	lat := make([]time.Duration, 0, s.n)
	for i := range s.n {
		if rc := s.recv[i].Load(); rc != 0 {
			lat = append(lat, time.Duration(rc-s.sent[i].Load()))
		}
	}
	if os.Getenv("BENCH_DEBUG") != "" {
		// When were the slow ones sent? (Periodic stalls show as clusters.)
		for i := range s.n {
			if rc := s.recv[i].Load(); rc != 0 && time.Duration(rc-s.sent[i].Load()) > 20*time.Millisecond {
				fmt.Fprintf(os.Stderr, "slow delivery: sent at +%s, took %s\n", time.Duration(s.sent[i].Load()-t0.UnixNano()).Round(time.Millisecond), time.Duration(rc-s.sent[i].Load()).Round(time.Millisecond))
			}
		}
	}
	r := reply{OK: len(lat), Missing: s.n - len(lat), Errors: int(errs.Load() + s.errors.Load()), Elapsed: time.Since(t0), Lat: summarize(lat), Resp: summarize(answered)}
	if e := firstErr.Load(); e != nil {
		r.FirstError = *e
	} else if e := s.firstErr.Load(); e != nil {
		r.FirstError = *e
	}
	return r, nil
}

// fanout sends one broadcast notify on the event all subscriptions of Set
// wait for, and measures until the last of them has its message.
func (p *clientProc) fanout(ctx context.Context, cmd command) (reply, error) {
	s := p.sets[cmd.Set]
	if s == nil {
		return reply{}, fmt.Errorf("no set %q", cmd.Set)
	}
	p.warmSet(ctx, s)
	body := s.notifyBody(s.event(0))
	var r reply
	t0 := time.Now()
	err := p.notify(ctx, s, body, s.n)
	r.NotifyTook = time.Since(t0)
	if err != nil {
		r.Errors++
		r.FirstError = err.Error()
	}
	waitReceived(s, 30*time.Second)
	lat := make([]time.Duration, 0, s.n)
	for i := range s.n {
		if rc := s.recv[i].Load(); rc != 0 {
			d := time.Duration(rc - t0.UnixNano())
			lat = append(lat, d)
			r.Last = max(r.Last, d)
			if r.First == 0 || d < r.First {
				r.First = d
			}
		}
	}
	r.OK, r.Missing, r.Lat = len(lat), s.n-len(lat), summarize(lat)
	r.Errors += int(s.errors.Load())
	if e := s.firstErr.Load(); e != nil && r.FirstError == "" {
		r.FirstError = *e
	}
	return r, nil
}

func waitReceived(s *subSet, patience time.Duration) {
	deadline := time.Now().Add(patience)
	for s.received.Load() < int64(s.n) && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
}

// ---- the server process's handle on the client process

type clientHandle struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *json.Decoder
	dead bool
}

func startClient() (*clientHandle, error) {
	// A gctrace is meant for the server process.
	c, err := startChild("-client", "client process", envWithout("GODEBUG="), os.Stderr)
	if err != nil {
		return nil, err
	}
	return &clientHandle{cmd: c.cmd, in: c.in, out: json.NewDecoder(c.out)}, nil
}

// do runs one command; when ctx ends first the client process is killed
// (its answer would come out of turn).
func (c *clientHandle) do(ctx context.Context, cmd command) (reply, error) {
	if c.dead {
		return reply{}, errors.New("client process is gone")
	}
	b := mustJSON(cmd)
	if _, err := c.in.Write(append(b, '\n')); err != nil {
		c.dead = true
		return reply{}, fmt.Errorf("client process: %w", err)
	}
	type result struct {
		r   reply
		err error
	}
	done := make(chan result, 1)
	go func() {
		var r reply
		err := c.out.Decode(&r)
		done <- result{r, err}
	}()
	select {
	case res := <-done:
		if res.err != nil {
			c.dead = true
			return reply{}, fmt.Errorf("client process: %w", res.err)
		}
		if res.r.Err != "" {
			return res.r, fmt.Errorf("client %s: %s", cmd.Op, res.r.Err)
		}
		return res.r, nil
	case <-ctx.Done():
		c.dead = true
		c.cmd.Process.Kill()
		return reply{}, ctx.Err()
	}
}

func (c *clientHandle) stop() {
	if !c.dead {
		c.in.Write([]byte(`{"op":"exit"}` + "\n"))
	}
	c.in.Close()
	waitOrKill(c.cmd, 30*time.Second)
}

// ---- latency summaries

type latency struct {
	N                  int
	P50, P90, P99, Max time.Duration
}

func summarize(d []time.Duration) latency {
	if len(d) == 0 {
		return latency{}
	}
	slices.Sort(d)
	at := func(p float64) time.Duration {
		i := int(p*float64(len(d))+0.999999) - 1 // nearest rank
		return d[min(max(i, 0), len(d)-1)]
	}
	return latency{N: len(d), P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: d[len(d)-1]}
}
