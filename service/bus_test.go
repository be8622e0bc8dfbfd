package service

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/bus"
)

// Replicas of one deployment get one channel however they log in; other
// databases, and other Redis database numbers, get others; no secret ends
// up in the name.
func TestBusChannelOfDeployment(t *testing.T) {
	ch := func(dbURL string, redisDB int) string {
		return bus.ChannelFor(deploymentOf(dbURL, "origin-x"), redisDB)
	}
	base := ch("mysql://app:secret@db.internal:3306/rendezvous", 0)
	for _, same := range []string{
		"mysql://app:secret@db.internal:3306/rendezvous",
		"mysql://other:another-secret@db.internal:3306/rendezvous",
		"mysql://app@DB.Internal/rendezvous",
		"mysql://db.internal:3306/rendezvous?timeout=5s&readTimeout=10s",
	} {
		require.Equal(t, base, ch(same, 0), "%s is the same deployment", same)
	}
	for _, other := range []string{
		"mysql://app:secret@db.internal:3306/rendezvous_staging",
		"mysql://app:secret@db2.internal:3306/rendezvous",
		"mysql://app:secret@db.internal:3307/rendezvous",
		"sqlite://rendezvous.db",
	} {
		require.NotEqual(t, base, ch(other, 0), "%s is another deployment", other)
	}
	require.NotEqual(t, base, ch("mysql://app:secret@db.internal:3306/rendezvous", 1), "another Redis database number")
	require.NotContains(t, deploymentOf("mysql://app:secret@db.internal:3306/rendezvous", "o"), "secret")
	require.NotContains(t, deploymentOf("postgres://app:secret@db/x", "o"), "secret")

	// SQLite: one file, however it is reached.
	dir := t.TempDir()
	t.Chdir(dir)
	abs := filepath.Join(dir, "x.db")
	require.Equal(t, ch("sqlite://x.db", 0), ch("sqlite://"+abs, 0))
	require.Equal(t, ch("sqlite://x.db", 0), ch("sqlite://./x.db?_pragma=foo", 0))
	require.NotEqual(t, ch("sqlite://x.db", 0), ch("sqlite://y.db", 0))
	// In memory: private to the process.
	require.NotEqual(t, bus.ChannelFor(deploymentOf("sqlite://:memory:", "a"), 0), bus.ChannelFor(deploymentOf("sqlite://:memory:", "b"), 0))
}
