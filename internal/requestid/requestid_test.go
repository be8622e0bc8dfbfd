package requestid

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestLogHandlerAddsTheRequestID(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(LogHandler(slog.NewJSONHandler(&buf, nil)))
	require.Equal(t, log.Handler(), LogHandler(log.Handler()), "not wrapped twice")

	log.InfoContext(With(context.Background(), "req-1"), "with", "k", "v")
	log.InfoContext(context.Background(), "without")
	log.Info("no context")
	log.With("a", 1).WithGroup("g").InfoContext(With(context.Background(), "req-2"), "grouped")

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	require.Len(t, lines, 4)
	require.Contains(t, lines[0], `"request_id":"req-1"`)
	require.Contains(t, lines[0], `"k":"v"`)
	require.NotContains(t, lines[1], "request_id")
	require.NotContains(t, lines[2], "request_id")
	require.Contains(t, lines[3], "req-2")
}
