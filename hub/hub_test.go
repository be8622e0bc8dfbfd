package hub_test

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"rendezvous/hub"
	"rendezvous/models"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// chanListener keeps the wakes of one listener in a channel of one and
// drops those that do not fit, as a subscriber slow to act would: a
// listener's function must never block.
type chanListener struct {
	*hub.Listener
	C chan hub.Wake
}

func listen(h *hub.Hub, waiterID string) *chanListener {
	c := make(chan hub.Wake, 1)
	l := h.Listen(waiterID, func(w hub.Wake) {
		select {
		case c <- w:
		default:
		}
	})
	return &chanListener{Listener: l, C: c}
}

// received returns the pending wake of l, if any, without waiting: Publish
// delivers synchronously, so after it returns a wake is either there or not.
func received(l *chanListener) (hub.Wake, bool) {
	select {
	case w := <-l.C:
		return w, true
	default:
		return hub.Wake{}, false
	}
}

func result(id string) *models.WaitResult {
	return &models.WaitResult{WaiterID: id, EventID: "ev-" + id}
}

func TestListenPublish(t *testing.T) {
	t.Parallel()
	h := hub.New()
	l := listen(h, "wtr_1")
	other := listen(h, "wtr_2")

	want := hub.Wake{Result: result("wtr_1")}
	h.Publish("wtr_1", want)

	got, ok := received(l)
	require.True(t, ok)
	require.Same(t, want.Result, got.Result)
	require.NoError(t, got.Err)

	_, ok = received(other)
	require.False(t, ok, "a wake for one waiter reaches no other")
	_, ok = received(l)
	require.False(t, ok, "one publish, one wake")

	// A nil result means "look in the database"; errors pass through.
	boom := errors.New("run canceled")
	h.Publish("wtr_2", hub.Wake{Err: boom})
	got, ok = received(other)
	require.True(t, ok)
	require.Nil(t, got.Result)
	require.ErrorIs(t, got.Err, boom)

	h.Unlisten(l.Listener)
	h.Unlisten(other.Listener)
}

func TestPublishWithoutListeners(t *testing.T) {
	t.Parallel()
	h := hub.New()
	h.Publish("wtr_nobody", hub.Wake{}) // nothing to wake, nothing to fail
	require.Zero(t, h.Len())
	require.Empty(t, h.WaiterIDs())
}

func TestSeveralListenersForOneWaiter(t *testing.T) {
	t.Parallel()
	h := hub.New()
	ls := []*chanListener{listen(h, "wtr_1"), listen(h, "wtr_1"), listen(h, "wtr_1")}
	require.Equal(t, 1, h.Len(), "Len counts waiters, not listeners")
	require.Equal(t, []string{"wtr_1"}, h.WaiterIDs())

	want := hub.Wake{Result: result("wtr_1")}
	h.Publish("wtr_1", want)
	for i, l := range ls {
		got, ok := received(l)
		require.True(t, ok, "listener %d", i)
		require.Same(t, want.Result, got.Result)
	}

	// Removing one leaves the others listening.
	h.Unlisten(ls[1].Listener)
	h.Publish("wtr_1", want)
	_, ok := received(ls[1])
	require.False(t, ok, "an unlistened listener gets nothing")
	for _, i := range []int{0, 2} {
		_, ok := received(ls[i])
		require.True(t, ok, "listener %d", i)
	}
	require.Equal(t, 1, h.Len())

	h.Unlisten(ls[0].Listener)
	h.Unlisten(ls[2].Listener)
	require.Zero(t, h.Len())
	require.Empty(t, h.WaiterIDs())
}

func TestPublishNeverBlocks(t *testing.T) {
	t.Parallel()
	h := hub.New()
	slow := listen(h, "wtr_1")
	fast := listen(h, "wtr_1")

	first := hub.Wake{Result: result("first")}
	h.Publish("wtr_1", first)
	require.Equal(t, first, <-fast.C)

	// slow never reads: its buffer is full, and further publishes return
	// at once (the test would hang otherwise) while fast still gets each.
	for i := range 100 {
		w := hub.Wake{Result: result(strconv.Itoa(i))}
		h.Publish("wtr_1", w)
		got, ok := received(fast)
		require.True(t, ok, "publish %d", i)
		require.Same(t, w.Result, got.Result)
	}

	// The pending wake is the first; the later ones were dropped.
	got, ok := received(slow)
	require.True(t, ok)
	require.Same(t, first.Result, got.Result)
	_, ok = received(slow)
	require.False(t, ok)

	h.Unlisten(slow.Listener)
	h.Unlisten(fast.Listener)
}

func TestUnlisten(t *testing.T) {
	t.Parallel()
	h := hub.New()
	a := listen(h, "wtr_1")
	b := listen(h, "wtr_1")
	c := listen(h, "wtr_2")

	h.Unlisten(a.Listener)
	h.Unlisten(a.Listener) // harmless, and must not remove b
	require.Equal(t, 2, h.Len())

	h.Publish("wtr_1", hub.Wake{})
	_, ok := received(a)
	require.False(t, ok)
	_, ok = received(b)
	require.True(t, ok)

	h.Unlisten(b.Listener)
	h.Unlisten(b.Listener)
	h.Unlisten(a.Listener)
	require.Equal(t, []string{"wtr_2"}, h.WaiterIDs())

	// Listening again after the last listener left works.
	again := listen(h, "wtr_1")
	h.Publish("wtr_1", hub.Wake{})
	_, ok = received(again)
	require.True(t, ok)

	h.Unlisten(again.Listener)
	h.Unlisten(c.Listener)
	h.Unlisten(c.Listener)
	require.Zero(t, h.Len())
	require.Empty(t, h.WaiterIDs())
}

func TestWaiterIDsAndLen(t *testing.T) {
	t.Parallel()
	h := hub.New()
	// Enough ids to land in every shard.
	var want []string
	listeners := map[string]*chanListener{}
	for i := range 1000 {
		id := fmt.Sprintf("wtr_%d", i)
		want = append(want, id)
		listeners[id] = listen(h, id)
	}
	listen(h, "wtr_7") // a second listener on one waiter adds no id
	require.Equal(t, 1000, h.Len())
	got := h.WaiterIDs()
	slices.Sort(got)
	slices.Sort(want)
	require.Equal(t, want, got)

	for i := 0; i < 1000; i += 2 {
		h.Unlisten(listeners[fmt.Sprintf("wtr_%d", i)].Listener)
	}
	require.Equal(t, 500, h.Len())
	for _, id := range h.WaiterIDs() {
		n, err := strconv.Atoi(id[len("wtr_"):])
		require.NoError(t, err)
		require.True(t, n%2 == 1, id)
	}

	// Ids are opaque strings: case, unicode and the empty string are kept apart.
	for _, id := range []string{"", "Wtr_1", "wtr_1 ", "wtr_✓"} {
		listen(h, id)
	}
	require.Equal(t, 504, h.Len())
	require.Contains(t, h.WaiterIDs(), "")
}

func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	h := hub.New()
	const workers, rounds = 32, 200

	shared := make([]*chanListener, 4)
	for i := range shared {
		shared[i] = listen(h, "wtr_shared")
	}

	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for r := range rounds {
				id := fmt.Sprintf("wtr_%d_%d", w, r)
				l := listen(h, id)
				extra := listen(h, id)
				h.Publish("wtr_shared", hub.Wake{}) // contends with everyone
				want := hub.Wake{Result: result(id)}
				h.Publish(id, want)
				_ = h.Len()
				_ = h.WaiterIDs()
				for _, x := range []*chanListener{l, extra} {
					got, ok := received(x)
					if !ok || got.Result != want.Result {
						errs <- fmt.Errorf("worker %d round %d: listener of %s missed its wake", w, r, id)
						return
					}
				}
				h.Unlisten(l.Listener)
				h.Unlisten(extra.Listener)
				h.Unlisten(l.Listener)
			}
		})
	}
	// Shared listeners drain while the workers publish.
	stop := make(chan struct{})
	var drain sync.WaitGroup
	for _, l := range shared {
		drain.Go(func() {
			for {
				select {
				case <-l.C:
				case <-stop:
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	drain.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}

	require.Equal(t, []string{"wtr_shared"}, h.WaiterIDs())
	for _, l := range shared {
		h.Unlisten(l.Listener)
	}
	require.Zero(t, h.Len())
}

func TestListenerMayUnlistenFromItsCall(t *testing.T) {
	t.Parallel()
	h := hub.New()
	var got []hub.Wake
	var l *hub.Listener
	l = h.Listen("wtr_1", func(w hub.Wake) {
		got = append(got, w)
		h.Unlisten(l) // from inside the call: Publish holds no lock by then
	})
	other := listen(h, "wtr_1")

	want := hub.Wake{Result: result("wtr_1")}
	h.Publish("wtr_1", want)
	require.Len(t, got, 1, "called once, on the publisher's goroutine")
	require.Same(t, want.Result, got[0].Result)
	w, ok := received(other)
	require.True(t, ok, "the other listener of the same waiter gets it too")
	require.Same(t, want.Result, w.Result)

	h.Publish("wtr_1", want)
	require.Len(t, got, 1, "unlistened: not called again")
	h.Unlisten(other.Listener)
	require.Zero(t, h.Len())
}
