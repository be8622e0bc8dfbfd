package service

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"time"

	"rendezvous/auth"
	"rendezvous/storage"
)

// hookKeyName is the service_keys row of the completion URL key.
const hookKeyName = "completion_url"

// hookSigner picks the secrets of completion URLs: RENDEZVOUS_HOOK_SECRET;
// else the run token secrets the operator set (RENDEZVOUS_SECRET: also
// kept on the server only; the key is derived, so the two kinds of token
// never pass for each other); else a random key stored once in the
// database, which every replica and every restart then reads. Not
// RENDEZVOUS_SIGNING_SECRET: the receivers of outbound calls hold it to
// check signatures, and could then forge completion URLs.
func hookSigner(ctx context.Context, cfg Config, runSecrets []string, store storage.Store, now time.Time, log *slog.Logger) (*auth.HookSigner, error) {
	secrets := cfg.HookSecrets
	if len(secrets) == 0 {
		secrets = runSecrets
	}
	if len(secrets) == 0 {
		var b [32]byte
		rand.Read(b[:])
		var key string
		err := store.InTx(ctx, func(tx storage.Executor) error {
			var err error
			key, err = tx.ServiceKeyGetOrCreate(ctx, hookKeyName, hex.EncodeToString(b[:]), now)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("completion URL key (set RENDEZVOUS_HOOK_SECRET to do without): %w", err)
		}
		log.Info("completion URLs are signed with the key stored in the database (service_keys); set RENDEZVOUS_HOOK_SECRET to choose your own")
		secrets = []string{key}
	}
	s, err := auth.NewHookSigner(secrets)
	if err != nil {
		return nil, fmt.Errorf("RENDEZVOUS_HOOK_SECRET: %w", err)
	}
	return s, nil
}
