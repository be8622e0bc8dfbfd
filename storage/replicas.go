// The replicas (leases) table's queries (split from gorm.go, one file per table as Temporal's sqlplugin does).

package storage

import (
	"context"
	"time"

	"gorm.io/gorm/clause"

	"rendezvous/models"
)

func (e *gormExecutor) ReplicaRenew(ctx context.Context, replicaID string, leaseUntil time.Time) error {
	res := e.q(ctx).Model(&replicaRow{}).Where("id = ?", replicaID).Update("lease_until", newDBTime(leaseUntil))
	if res.Error != nil {
		return e.classify(res.Error)
	}
	if res.RowsAffected == 1 {
		return nil
	}
	err := e.q(ctx).Clauses(clause.OnConflict{
		Columns:   []clause.Column{{Name: "id"}},
		DoUpdates: clause.Assignments(map[string]any{"lease_until": newDBTime(leaseUntil)}),
	}).Create(&replicaRow{ID: replicaID, LeaseUntil: newDBTime(leaseUntil)}).Error
	return e.classify(err)
}

func (e *gormExecutor) ReplicaRelease(ctx context.Context, replicaID string) error {
	return e.classify(e.q(ctx).Where("id = ?", replicaID).Delete(&replicaRow{}).Error)
}

func (e *gormExecutor) WaiterReapOrphans(ctx context.Context, now time.Time) (int64, error) {
	var dead []string
	if err := e.q(ctx).Model(&replicaRow{}).Where("lease_until <= ?", newDBTime(now)).Pluck("id", &dead).Error; err != nil {
		return 0, e.classify(err)
	}
	if len(dead) == 0 {
		return 0, nil
	}
	res := e.q(ctx).Where("replica_id IN ? AND state = ?", dead, string(models.WaiterWaiting)).Delete(&waiterRow{})
	if res.Error != nil {
		return 0, e.classify(res.Error)
	}
	// A replica that was only cut off renews (re-creates) its lease when it
	// is back; its waiters are gone by then and its subscribers are told so.
	if err := e.q(ctx).Where("id IN ? AND lease_until <= ?", dead, newDBTime(now)).Delete(&replicaRow{}).Error; err != nil {
		return 0, e.classify(err)
	}
	return res.RowsAffected, nil
}
