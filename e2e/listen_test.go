package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// nonLoopbackIP is an address of this machine that other machines could
// reach, or nil when it has none.
func nonLoopbackIP(t *testing.T) net.IP {
	t.Helper()
	ifaces, err := net.Interfaces()
	require.NoError(t, err)
	var v6 net.IP
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok || ipn.IP.IsLoopback() || ipn.IP.IsLinkLocalUnicast() {
				continue
			}
			if ipn.IP.To4() != nil {
				return ipn.IP
			}
			if v6 == nil {
				v6 = ipn.IP
			}
		}
	}
	return v6
}

// listening serves a service started the way server.go starts it (Listen,
// then Serve) and returns it, its port and its log.
func listening(t *testing.T, cfg service.Config) (svc *service.Service, port int, logs *syncBuffer) {
	t.Helper()
	logs = &syncBuffer{}
	cfg.DatabaseURL = testdb.SQLite(t)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	svc, err := service.New(context.Background(), cfg)
	require.NoError(t, err)
	ln, err := svc.Listen()
	if err != nil {
		svc.Close()
		require.NoError(t, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- svc.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-served)
	})
	return svc, ln.Addr().(*net.TCPAddr).Port, logs
}

// reachable says whether /healthz answers on host:port.
func reachable(host string, port int) error { return reachablePath(host, port, "/healthz") }

// reachablePath says whether path answers 200 on host:port.
func reachablePath(host string, port int, path string) error {
	c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + net.JoinHostPort(host, strconv.Itoa(port)) + path)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// Without tokens and without an address that names a host, the server
// listens on loopback only, and says so with how to expose it; with
// tokens, or with an address naming every interface, it is reachable from
// other machines. The metrics listener follows the same rule.
func TestListenOpenDefaultIsLoopback(t *testing.T) {
	ip := nonLoopbackIP(t)
	if ip == nil {
		t.Log("this machine has no non-loopback address: only the loopback half runs")
	}
	outside := func() string { return ip.String() }

	t.Run("open defaults", func(t *testing.T) {
		// ":0" is how a default (PORT alone, or nothing) reaches Listen,
		// on a free port.
		svc, port, logs := listening(t, service.Config{Addr: ":0", MetricsAddr: ":0"})
		require.NoError(t, reachable("127.0.0.1", port), "open server on loopback")
		if ip != nil {
			require.Error(t, reachable(outside(), port), "an open server must not be reachable on %s", ip)
		}
		require.Contains(t, logs.String(), fmt.Sprintf("rendezvous listening on 127.0.0.1:%d (loopback only), OPEN", port))
		require.Contains(t, logs.String(), fmt.Sprintf("RENDEZVOUS_LISTEN=0.0.0.0:%d", port), "the log says how to expose it")
		eventually(t, 10*time.Second, func() bool { return svc.MetricsAddr() != "" }, "the metrics listener opens")
		_, mport, err := net.SplitHostPort(svc.MetricsAddr())
		require.NoError(t, err)
		metricsPort, _ := strconv.Atoi(mport)
		require.Equal(t, "127.0.0.1:"+mport, svc.MetricsAddr())
		require.NoError(t, reachablePath("127.0.0.1", metricsPort, "/metrics"))
		if ip != nil {
			require.Error(t, reachablePath(outside(), metricsPort, "/metrics"), "a token-less /metrics must not be reachable on %s", ip)
		}
	})
	t.Run("open on an address the operator named", func(t *testing.T) {
		host := "0.0.0.0"
		if ip != nil && ip.To4() == nil {
			host = "::"
		}
		_, port, logs := listening(t, service.Config{Addr: net.JoinHostPort(host, "0")})
		require.NoError(t, reachable("127.0.0.1", port))
		require.Contains(t, logs.String(), "(every interface), OPEN")
		if ip != nil {
			require.NoError(t, reachable(outside(), port), "RENDEZVOUS_LISTEN=%s:… exposes it", host)
		}
	})
	t.Run("tokens", func(t *testing.T) {
		cfg := service.Config{Addr: ":0"}
		secTokens(&cfg)
		_, port, logs := listening(t, cfg)
		require.NoError(t, reachable("127.0.0.1", port))
		require.Contains(t, logs.String(), "server tokens required")
		if ip != nil {
			require.NoError(t, reachable(outside(), port), "with tokens it serves every interface")
		}
	})
}
