package main

// The same-run peer: github.com/centrifugal/centrifuge (the library under
// the Centrifugo server) as a server in a process of its own (this binary
// run with -peer-server), as Rendezvous is a server in the bench's main
// process. Its clients are github.com/centrifugal/centrifuge-go clients in
// a client process of their own (peerclient.go).
//
// The peer process serves, on one loopback port:
//
//	/connection/websocket  centrifuge's websocket transport (JSON protocol)
//	POST /api/publish      {"channel":…,"data":…} → node.Publish, answers {"result":{}}
//	                       (the shape of Centrifugo's HTTP API publish: a server
//	                       API call from the load generator, as our notify is)
//	GET /bench/mem         settle, collect, return freed memory, then RSS, heap,
//	                       stacks, goroutines: the method the bench uses on itself
//	GET /bench/gc          its runtime/metrics GC reading (gcSample)
//	GET /bench/subs        its hub's number of subscriptions
//
// The node runs with the library's defaults (memory broker, no history, no
// presence, the default websocket buffers): what a Centrifugo-style server
// does for a plain publish to a channel without history.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"time"

	"github.com/centrifugal/centrifuge"
)

// peerVersion names the peer in the table (go.mod pins it).
const peerVersion = "centrifuge v0.40.1"

// peerMem is memSnap on the wire.
type peerMem struct {
	RSS, Heap, Stacks uint64
	Goroutines        int
}

// runPeerServer is the peer process: it serves until its stdin closes.
func runPeerServer() error {
	h, shutdown, err := newPeerServer()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		shutdown()
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	fmt.Printf("%s\n", mustJSON(map[string]any{"addr": ln.Addr().String(), "pid": os.Getpid()}))
	io.Copy(io.Discard, os.Stdin) // until the bench closes the pipe
	srv.Close()
	return shutdown()
}

// newPeerServer starts a centrifuge node and returns the peer's HTTP
// handler and how to stop the node.
func newPeerServer() (http.Handler, func() error, error) {
	node, err := centrifuge.New(centrifuge.Config{LogLevel: centrifuge.LogLevelError, LogHandler: func(e centrifuge.LogEntry) {
		log.Printf("peer: %s %v", e.Message, e.Fields)
	}})
	if err != nil {
		return nil, nil, err
	}
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: "bench"}}, nil
	})
	node.OnConnect(func(c *centrifuge.Client) {
		c.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			cb(centrifuge.SubscribeReply{}, nil)
		})
	})
	if err := node.Run(); err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	mux.HandleFunc("POST /api/publish", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Channel string          `json:"channel"`
			Data    json.RawMessage `json:"data"`
		}
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewDecoder(io.LimitReader(r.Body, 4<<20)).Decode(&req); err != nil || req.Channel == "" {
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"error":{"code":107,"message":"bad request"}}`)
			return
		}
		if _, err := node.Publish(req.Channel, req.Data); err != nil {
			w.Write(mustJSON(map[string]any{"error": map[string]any{"code": 100, "message": err.Error()}}))
			return
		}
		io.WriteString(w, `{"result":{}}`)
	})
	mux.HandleFunc("GET /bench/mem", func(w http.ResponseWriter, r *http.Request) {
		settle()
		m := snapMem()
		w.Write(mustJSON(peerMem{RSS: m.rss, Heap: m.heap, Stacks: m.stacks, Goroutines: m.goroutines}))
	})
	mux.HandleFunc("GET /bench/gc", func(w http.ResponseWriter, r *http.Request) {
		w.Write(mustJSON(readGC()))
	})
	mux.HandleFunc("GET /bench/subs", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, node.Hub().NumSubscriptions())
	})
	shutdown := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return node.Shutdown(ctx)
	}
	return mux, shutdown, nil
}

// peerHandle is the bench's handle on the peer process.
type peerHandle struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	addr string
	pid  int
	hc   *http.Client
}

func startPeer() (*peerHandle, error) {
	// The peer runs with Go's GC defaults, as shipped: GC settings (and a
	// gctrace) in the environment are meant for our server.
	c, err := startChild("-peer-server", "peer process", envWithout("GODEBUG=", "GOGC=", "GOMEMLIMIT="), os.Stderr)
	if err != nil {
		return nil, err
	}
	cmd, in, out := c.cmd, c.in, c.out
	p := &peerHandle{cmd: cmd, in: in, pid: cmd.Process.Pid, hc: &http.Client{Timeout: time.Minute}}
	line, err := bufio.NewReader(out).ReadBytes('\n')
	var hello struct {
		Addr string `json:"addr"`
	}
	if err == nil {
		err = json.Unmarshal(line, &hello)
	}
	if err != nil || hello.Addr == "" {
		p.stop()
		return nil, fmt.Errorf("peer process did not say where it listens: %v (%q)", err, line)
	}
	p.addr = hello.Addr
	return p, nil
}

func (p *peerHandle) wsURL() string  { return "ws://" + p.addr + "/connection/websocket" }
func (p *peerHandle) apiURL() string { return "http://" + p.addr + "/api/publish" }

func (p *peerHandle) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := p.hc.Do(req)
	if err != nil {
		return fmt.Errorf("peer %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("peer %s: HTTP %d: %.200s", path, resp.StatusCode, b)
	}
	return json.Unmarshal(b, v)
}

func (p *peerHandle) mem(ctx context.Context) (memSnap, error) {
	var m peerMem
	err := p.get(ctx, "/bench/mem", &m)
	return memSnap{rss: m.RSS, heap: m.Heap, stacks: m.Stacks, goroutines: m.Goroutines}, err
}

func (p *peerHandle) gc(ctx context.Context) (gcSample, error) {
	var g gcSample
	err := p.get(ctx, "/bench/gc", &g)
	return g, err
}

func (p *peerHandle) subs(ctx context.Context) (int, error) {
	var n int
	err := p.get(ctx, "/bench/subs", &n)
	return n, err
}

func (p *peerHandle) stop() {
	p.in.Close()
	waitOrKill(p.cmd, 20*time.Second)
}

// peerPublish posts one publish to the peer's API.
func peerPublish(ctx context.Context, hc *http.Client, url string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	var r struct {
		Result json.RawMessage `json:"result"`
		Error  *struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(b, &r); err != nil || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("peer publish: HTTP %d: %.200s", resp.StatusCode, b)
	}
	if r.Error != nil {
		return errors.New("peer publish: " + r.Error.Message)
	}
	return nil
}
