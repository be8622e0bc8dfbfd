package service

import (
	"net"
	"net/url"
	"path/filepath"
	"strings"
)

// deploymentOf names the database a deployment keeps its truth in, so that
// the bus channel is the same for every replica of one deployment and
// different for deployments on different databases sharing a Redis.
//
// MySQL: host:port/dbname, host lowercased and the default port filled in;
// the user, the password and the parameters are left out (replicas may log
// in differently, and a secret must never reach a channel name, even
// hashed). SQLite: the file's absolute path (replicas sharing a file run on
// one machine, maybe from different directories). An in-memory SQLite is
// private to its process: origin keeps it apart from everyone.
//
// Replicas of one deployment must spell the database host the same way
// (db.internal and 10.0.0.5 are different names here), or set
// RENDEZVOUS_BUS_CHANNEL to one value on all of them.
func deploymentOf(databaseURL, origin string) string {
	scheme, rest, _ := strings.Cut(databaseURL, "://")
	switch scheme {
	case "mysql":
		u, err := url.Parse(databaseURL)
		if err != nil {
			return "mysql-unparsed:" + origin // storage.Open refuses it anyway
		}
		port := u.Port()
		if port == "" {
			port = "3306"
		}
		return "mysql://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port) + "/" + strings.TrimPrefix(u.Path, "/")
	case "sqlite", "sqlite3":
		path, _, _ := strings.Cut(rest, "?")
		path = strings.TrimPrefix(path, "file:")
		if path == "" || path == ":memory:" {
			return "sqlite-memory:" + origin
		}
		if abs, err := filepath.Abs(path); err == nil {
			path = abs
		}
		return "sqlite://" + filepath.Clean(path)
	default:
		return "unknown:" + origin // storage.Open refuses it; never echo a URL that may hold a password
	}
}
