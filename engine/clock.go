package engine

import (
	"context"
	"time"
)

// The engine's clock is the database's. Replicas compare times that other
// replicas wrote (a lease's end, a waiter's deadline, a lookback event's
// expiry), so those times must come from one clock, and the database is
// the one every replica reaches.
//
// How: each replica reads the database's clock at start and every lease
// renewal (DBNow, one small query every LeaseTTL/4), keeps the difference
// to its own, and adds it to its own clock for every time it stores or
// compares. The alternatives were to compute every time in SQL
// (CURRENT_TIMESTAMP in each INSERT and WHERE): exact, but the engine would
// still need the database's time in Go for its own timers (a durable step's
// deadline written by another replica), each dialect would need its own
// expressions, and registration would have to read its deadline back; or to
// read the clock in every transaction, a round trip more on the notify path.
// The difference costs nothing per request and is off by less than one
// round trip to the database (milliseconds, against a lease of seconds):
// the reading is taken as of when the answer arrived, so this clock runs at
// most that much behind the database's, never ahead, and a deadline timer
// never fires before the database's deadline. A step in this machine's
// clock is corrected at the next reading.

// Now is the engine's clock (the database's), for callers that compare it
// with times the engine or another replica wrote, such as a run token's
// expiry.
func (e *Engine) Now() time.Time { return e.now() }

func (e *Engine) now() time.Time {
	off := e.cfg.ClockSkew + time.Duration(e.clockOffset.Load())
	return e.cfg.Now().Add(off).UTC().Truncate(time.Microsecond)
}

// SyncClock reads the database's clock and sets this replica's by it.
// Service start-up calls it before serving; the lease loop calls it again
// every renewal.
func (e *Engine) SyncClock(ctx context.Context) error {
	before := time.Now()
	db, err := e.store.DBNow(ctx)
	if err != nil {
		return storageErr("read the database clock", err)
	}
	after := time.Now()
	// Measured against this machine's real clock (time.Now, and the skew a
	// test gives it), not Config.Now: a test that moves Config.Now forward
	// moves this replica's time forward on top of the database's.
	off := db.Sub(after.Add(e.cfg.ClockSkew))
	prev := time.Duration(e.clockOffset.Swap(int64(off)))
	first := !e.clockSynced.Swap(true)
	if rtt := after.Sub(before); rtt > time.Second {
		e.log.Warn("reading the database clock took long; this replica's clock may be behind the database's by as much", "round_trip", rtt)
	}
	if d := off - prev; (first || d > time.Second || d < -time.Second) && (off > time.Second || off < -time.Second) {
		e.log.Warn("this machine's clock differs from the database's; leases, deadlines and expiries use the database's", "database_minus_local", off.Round(time.Millisecond))
	}
	return nil
}
