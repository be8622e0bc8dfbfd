package service

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
)

// DefaultPort is the API's port when neither RENDEZVOUS_LISTEN nor PORT
// names one.
const DefaultPort = "8080"

// loopbackHost is where an endpoint that answers without a token listens
// when the operator named no host. Only IPv4's: one socket, an address that
// works as typed on every machine (also where lo has no ::1), and clients
// asking for "localhost" fall back to it (browsers and curl try both).
const loopbackHost = "127.0.0.1"

// parseListen checks host:port, [v6]:port or :port, the port a number.
func parseListen(name, v string) (host, port string, err error) {
	host, port, err = net.SplitHostPort(v)
	if err == nil {
		_, err = strconv.ParseUint(port, 10, 16)
	}
	if err != nil {
		return "", "", fmt.Errorf("%s %q: want host:port, [::1]:port or :port, e.g. 127.0.0.1:8080 or 0.0.0.0:8080", name, v)
	}
	return host, port, nil
}

// bindAddr is the safe-default rule, the same for the API and the metrics
// listener: an address that names no host (":8080", or PORT alone) listens
// on loopback when whoever reaches the endpoint needs no token (open), and
// on every interface when a token is needed. A host the operator named
// (0.0.0.0, [::], an interface's address, localhost) is their explicit
// choice and is kept. That is Temporal's dev server default (127.0.0.1
// until told otherwise) and the spirit of Redis' protected mode (no
// password: local clients only).
func bindAddr(addr string, open bool) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host != "" || !open {
		return addr
	}
	return net.JoinHostPort(loopbackHost, port)
}

// listenAddrs applies bindAddr to the API's address (open: no server
// tokens) and the metrics listener's (open: it needs no token).
func (c Config) listenAddrs(apiOpen bool) (api, metrics string) {
	addr := c.Addr
	if addr == "" {
		addr = ":" + DefaultPort
	}
	api = bindAddr(addr, apiOpen)
	if c.MetricsAddr != "" {
		metrics = bindAddr(c.MetricsAddr, !c.metricsNeedToken(apiOpen))
	}
	return api, metrics
}

// metricsNeedToken: /metrics wants a server token on the main port when
// there are tokens; a separate metrics port is private (loopback unless it
// names a host) and needs none, unless RENDEZVOUS_METRICS_TOKEN_REQUIRED.
func (c Config) metricsNeedToken(apiOpen bool) bool {
	if c.MetricsTokenRequired != nil {
		return *c.MetricsTokenRequired
	}
	return c.MetricsAddr == "" && !apiOpen
}

// exposure says who can reach a listener on addr.
func exposure(addr net.Addr) (loopback bool, who string) {
	tcp, ok := addr.(*net.TCPAddr)
	switch {
	case !ok:
		return false, "this address"
	case tcp.IP.IsLoopback():
		return true, "loopback only"
	case tcp.IP.IsUnspecified():
		return false, "every interface"
	default:
		return false, "this interface only"
	}
}

// logListening is the start-up line: the address, who can reach it, whether
// it is open, and what to set to change that.
func (s *Service) logListening(addr net.Addr) {
	loopback, who := exposure(addr)
	port := DefaultPort
	if tcp, ok := addr.(*net.TCPAddr); ok {
		port = strconv.Itoa(tcp.Port)
	}
	attrs := []any{"addr", addr.String(), "exposure", who, "database", s.Store.Dialect(), "playground", s.cfg.Playground}
	switch {
	case !s.open:
		s.log.Info(fmt.Sprintf("rendezvous listening on %s (%s); server tokens required", addr, who), append(attrs, "auth", "tokens")...)
	case loopback:
		s.log.Warn(fmt.Sprintf("rendezvous listening on %s (%s), OPEN: no server tokens, so only this machine may call it. "+
			"To serve other machines configure RENDEZVOUS_TOKENS (it then listens on every interface), "+
			"or expose it open on purpose with RENDEZVOUS_LISTEN=0.0.0.0:%s", addr, who, port), append(attrs, "auth", "open")...)
	default:
		s.log.Warn(fmt.Sprintf("rendezvous listening on %s (%s), OPEN: no server tokens, and RENDEZVOUS_LISTEN names a reachable address: "+
			"anyone who reaches this port can call every operation. Configure RENDEZVOUS_TOKENS, "+
			"or keep it to this machine with RENDEZVOUS_LISTEN=127.0.0.1:%s", addr, who, port), append(attrs, "auth", "open")...)
	}
}

// logMetricsListening says where /metrics is served and whether it needs a
// token.
func (s *Service) logMetricsListening(addr net.Addr, tokenRequired bool) {
	loopback, who := exposure(addr)
	lv, hint := slog.LevelInfo, ""
	if !tokenRequired && !loopback {
		lv, hint = slog.LevelWarn, "; it needs no token: keep this port private or set RENDEZVOUS_METRICS_TOKEN_REQUIRED=true"
	}
	s.log.Log(context.Background(), lv, fmt.Sprintf("metrics listening on %s (%s)%s", addr, who, hint),
		"addr", addr.String(), "exposure", who, "token_required", tokenRequired)
}
