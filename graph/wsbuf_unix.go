//go:build unix

package graph

import (
	"io"
	"net"
	"os"
	"syscall"
)

// fill reads what the socket has into a pooled buffer, waiting for it to
// become readable without one: the buffer is taken for each attempt and
// given back when the socket has nothing yet, so that the runtime's poller
// waits with none held. It costs the system calls a plain read costs.
func (c *leanConn) fill() (*[]byte, int, error) {
	if c.raw == nil {
		return c.fillBlocking()
	}
	var (
		b    *[]byte
		n    int
		rerr error
	)
	err := c.raw.Read(func(fd uintptr) bool {
		b = leanReadPool.Get().(*[]byte)
		for {
			n, rerr = syscall.Read(int(fd), *b)
			if rerr != syscall.EINTR {
				break
			}
		}
		if rerr == syscall.EAGAIN || rerr == syscall.EWOULDBLOCK {
			leanReadPool.Put(b)
			b = nil
			return false // wait until readable
		}
		return true
	})
	switch {
	case err != nil: // closed, or a deadline; the last attempt gave its buffer back
		return nil, 0, err
	case rerr != nil:
		return b, 0, &net.OpError{Op: "read", Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return b, 0, io.EOF
	}
	return b, n, nil
}
