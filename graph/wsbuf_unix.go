//go:build unix

package graph

import "syscall"

// waitReadable parks until the socket has bytes to read (or has an error
// or end of stream to report), holding no buffer meanwhile: a peek of one
// byte that would block tells the runtime's poller to wait.
func waitReadable(raw syscall.RawConn) error {
	var one [1]byte
	return raw.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), one[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return err != syscall.EAGAIN && err != syscall.EWOULDBLOCK
	})
}
