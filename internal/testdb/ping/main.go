// Command ping tells whether the MySQL server the tests use is reachable:
// exit 0 if it answers, 1 if not. scripts/test uses it to say plainly which
// databases the suite ran on.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"rendezvous/internal/testdb"
)

func main() {
	u := testdb.AdminURL(os.Getenv)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := testdb.Ping(ctx, u); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", u, err)
		os.Exit(1)
	}
}
