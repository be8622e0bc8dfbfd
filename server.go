// Command rendezvous serves the Rendezvous GraphQL API: workflow runs wait
// for events (waitForEvent) and others notify them (notify), with lookback.
//
//	go run .                      # embedded SQLite in ./rendezvous.db, Playground on 127.0.0.1:8080
//	DATABASE_URL=mysql://root@127.0.0.1:3306/test go run .
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"rendezvous/service"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "rendezvous:", err)
		os.Exit(1)
	}
}

func run() error {
	log := service.NewLogger(os.Getenv("LOG_LEVEL"))
	cfg, err := service.ConfigFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	cfg.Logger = log
	gc, err := service.GCConfigFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	service.ApplyGC(gc, log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	svc, err := service.New(ctx, cfg)
	if err != nil {
		return err
	}
	ln, err := svc.Listen()
	if err != nil {
		svc.Close()
		return err
	}
	return svc.Serve(ctx, ln)
}
