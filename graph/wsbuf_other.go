//go:build !unix

package graph

// fill: without the poller's raw reads, the buffer is taken before the
// read waits.
func (c *leanConn) fill() (*[]byte, int, error) { return c.fillBlocking() }
