package graph

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"sync"
	"syscall"
)

// An idle websocket should cost little more than its socket. coder/websocket
// keeps, for the connection's life, the bufio.Reader and bufio.Writer that
// net/http's Hijack returns: 4 KB each, 8 KB per connection that, on a
// server holding tens of thousands of idle subscriptions, is mostly never
// used (an idle connection reads a pong every keep-alive and writes a ping).
// leanHijack hands Accept a connection instead whose reads take a buffer
// from a pool only while bytes are waiting (an idle connection holds none:
// it waits for the socket to become readable without a buffer), under a
// bufio.Reader of the smallest size, and a bufio.Writer of leanWriteBuffer
// bytes: a frame that fits goes out in one write as before, a larger one
// in two.

const (
	// leanWriteBuffer holds a frame header and a typical result; bigger
	// frames are written in two calls (the part that fits, then the rest
	// straight from the caller's buffer).
	leanWriteBuffer = 1 << 10
	// leanReadBuffer is the size of the pooled read buffers; a read asking
	// for at least that much goes straight to the socket.
	leanReadBuffer = 4 << 10
	// minBufioReader is the smallest bufio.Reader there is; it holds a
	// frame header's bytes between reads.
	minBufioReader = 16
)

var leanReadPool = sync.Pool{New: func() any {
	b := make([]byte, leanReadBuffer)
	return &b
}}

// leanHijacker is the ResponseWriter given to coder/websocket's Accept:
// its Hijack (which Accept finds before any Unwrap) wraps the connection.
type leanHijacker struct {
	http.ResponseWriter
	hj http.Hijacker
}

// withLeanHijack returns w with the lean Hijack, or w itself when it cannot
// hijack (Accept then answers 501 as before).
func withLeanHijack(w http.ResponseWriter) http.ResponseWriter {
	hj, ok := hijackerOf(w)
	if !ok {
		return w
	}
	return leanHijacker{ResponseWriter: w, hj: hj}
}

func hijackerOf(w http.ResponseWriter) (http.Hijacker, bool) {
	for {
		switch t := w.(type) {
		case http.Hijacker:
			return t, true
		case interface{ Unwrap() http.ResponseWriter }:
			w = t.Unwrap()
		default:
			return nil, false
		}
	}
}

func (h leanHijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := h.hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	lc := &leanConn{Conn: conn}
	if n := brw.Reader.Buffered(); n > 0 {
		// Sent by the client right behind its upgrade request.
		b, _ := brw.Reader.Peek(n)
		lc.pending = bytes.Clone(b)
	}
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			lc.raw = raw
		}
	}
	return lc, bufio.NewReadWriter(bufio.NewReaderSize(lc, minBufioReader), bufio.NewWriterSize(conn, leanWriteBuffer)), nil
}

// leanConn reads through a pooled buffer that it gives back as soon as it
// is drained. Reads come from one goroutine at a time (coder/websocket's
// reader holds its read lock); Close and writes go to the socket.
type leanConn struct {
	net.Conn
	// raw lets a read wait for the socket to become readable before taking
	// a buffer (see fill); nil when the connection is not a socket (then the
	// buffer is taken before the read blocks, which is correct, only less
	// lean).
	raw syscall.RawConn
	// pending: bytes that arrived with the upgrade request.
	pending []byte
	// buf[r:w] are read and not yet consumed; buf is nil when drained.
	buf  *[]byte
	r, w int
}

func (c *leanConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		if c.pending = c.pending[n:]; len(c.pending) == 0 {
			c.pending = nil
		}
		return n, nil
	}
	if c.buf == nil {
		if len(p) >= leanReadBuffer {
			return c.Conn.Read(p) // the caller's buffer is big enough
		}
		b, n, err := c.fill()
		if n <= 0 {
			if b != nil {
				leanReadPool.Put(b)
			}
			return 0, err
		}
		c.buf, c.r, c.w = b, 0, n
	}
	n := copy(p, (*c.buf)[c.r:c.w])
	c.r += n
	if c.r == c.w {
		leanReadPool.Put(c.buf)
		c.buf = nil
	}
	return n, nil
}

// fill reads into a pooled buffer: the buffer (nil only with an error) and
// the n bytes read into it.

// fillBlocking takes a pooled buffer and reads into it, waiting with it.
func (c *leanConn) fillBlocking() (*[]byte, int, error) {
	b := leanReadPool.Get().(*[]byte)
	n, err := c.Conn.Read(*b)
	return b, n, err
}
