package graph

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	coderws "github.com/coder/websocket"
	"github.com/stretchr/testify/require"
)

// tcpPair is a connected pair of real sockets.
func tcpPair(t *testing.T) (server, client net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

func newLeanConn(t *testing.T, conn net.Conn, pending string) *leanConn {
	lc := &leanConn{Conn: conn}
	if pending != "" {
		lc.pending = []byte(pending)
	}
	raw, err := conn.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	lc.raw = raw
	return lc
}

// What was read behind the upgrade request comes first, then the socket's
// bytes, in reads of any size; drained, the connection holds no buffer; the
// peer's close is io.EOF, and our own close ends a read that waits.
func TestLeanConnReads(t *testing.T) {
	server, client := tcpPair(t)
	lc := newLeanConn(t, server, "early")
	br := bufio.NewReaderSize(lc, minBufioReader)

	got := make([]byte, 5)
	_, err := io.ReadFull(br, got)
	require.NoError(t, err)
	require.Equal(t, "early", string(got))

	// Small reads through the 16-byte bufio.Reader, a message at a time.
	for i := range 3 {
		msg := strings.Repeat(string(rune('a'+i)), 100+i)
		_, err := client.Write([]byte(msg))
		require.NoError(t, err)
		got := make([]byte, len(msg))
		_, err = io.ReadFull(br, got)
		require.NoError(t, err)
		require.Equal(t, msg, string(got))
		require.Nil(t, lc.buf, "drained: no buffer held")
	}

	// A read asking for more than a pooled buffer goes straight to the socket.
	big := strings.Repeat("x", 3*leanReadBuffer)
	go client.Write([]byte(big))
	gotBig := make([]byte, len(big))
	_, err = io.ReadFull(lc, gotBig)
	require.NoError(t, err)
	require.Equal(t, big, string(gotBig))
	require.Nil(t, lc.buf)

	client.Close()
	_, err = lc.Read(make([]byte, 10))
	require.ErrorIs(t, err, io.EOF)

	// A read waiting on an idle socket ends when the socket is closed.
	server2, _ := tcpPair(t)
	lc2 := newLeanConn(t, server2, "")
	done := make(chan error, 1)
	go func() {
		_, err := lc2.Read(make([]byte, 10))
		done <- err
	}()
	time.AfterFunc(50*time.Millisecond, func() { server2.Close() })
	select {
	case err := <-done:
		require.True(t, errors.Is(err, net.ErrClosed), "%v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the read did not end with the close")
	}
	require.Nil(t, lc2.buf)
}

// Through a real upgrade: coder/websocket reads and writes messages larger
// and smaller than the buffers, and a message the client sent right behind
// its upgrade request is not lost.
func TestLeanHijackWebsocket(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := coderws.Accept(withLeanHijack(w), r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ws.SetReadLimit(1 << 20)
		for {
			typ, data, err := ws.Read(r.Context())
			if err != nil {
				return
			}
			if ws.Write(r.Context(), typ, data) != nil {
				return
			}
		}
	}))
	defer srv.Close()

	// The upgrade request and a first frame in one write.
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	req := "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
	frame := []byte{0x81, 0x80 | 2, 1, 2, 3, 4, 'h' ^ 1, 'i' ^ 2} // masked text "hi"
	_, err = conn.Write(append([]byte(req), frame...))
	require.NoError(t, err)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second)) // a lost frame fails, not hangs
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	echo := make([]byte, 4)
	_, err = io.ReadFull(br, echo)
	require.NoError(t, err)
	require.Equal(t, []byte{0x81, 2, 'h', 'i'}, echo)

	// Messages of many sizes, through a client of the library.
	ws, _, err := coderws.Dial(t.Context(), srv.URL, nil)
	require.NoError(t, err)
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 20)
	for _, n := range []int{0, 1, 15, 16, 17, 125, 126, 1000, leanWriteBuffer - 10, leanWriteBuffer, leanWriteBuffer + 1, leanReadBuffer, 3*leanReadBuffer + 7, 200_000} {
		msg := []byte(strings.Repeat("é", n/2) + strings.Repeat("z", n%2))
		require.NoError(t, ws.Write(t.Context(), coderws.MessageText, msg))
		_, got, err := ws.Read(t.Context())
		require.NoError(t, err)
		require.Equal(t, string(msg), string(got), "%d bytes", n)
	}
	require.NoError(t, ws.Close(coderws.StatusNormalClosure, ""))
}
