package auth

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestDeliverySignatureRotation(t *testing.T) {
	s, err := NewDeliverySigner([]string{"new-secret-0123456789", "old-secret-0123456789"})
	require.NoError(t, err)
	now := time.Unix(1_700_000_000, 0)
	body := []byte(`{"workflowRunId":"wfr_1"}`)
	h := s.Sign(body, now)
	require.True(t, strings.HasPrefix(h, "t=1700000000,v1="))
	require.Equal(t, 2, strings.Count(h, "v1="))
	require.NoError(t, VerifyDeliverySignature(h, body, "old-secret-0123456789", now, time.Minute))
	require.NoError(t, VerifyDeliverySignature(h, body, "new-secret-0123456789", now.Add(30*time.Second), time.Minute))
	require.Error(t, VerifyDeliverySignature(h, body, "other-secret-0123456789", now, time.Minute))
	require.Error(t, VerifyDeliverySignature(h, []byte(`{"workflowRunId":"wfr_2"}`), "new-secret-0123456789", now, time.Minute))
	require.Error(t, VerifyDeliverySignature(h, body, "new-secret-0123456789", now.Add(2*time.Minute), time.Minute))
	require.NotContains(t, s.String(), "secret-0123")
	_, err = NewDeliverySigner([]string{"short"})
	require.Error(t, err)
}
