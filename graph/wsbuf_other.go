//go:build !unix

package graph

import "syscall"

// waitReadable: without a portable peek, the read takes its buffer first.
func waitReadable(syscall.RawConn) error { return nil }
