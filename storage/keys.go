// The service_keys table's queries: secrets the service makes for itself
// and shares between its replicas through the database (the completion URL
// key when no RENDEZVOUS_HOOK_SECRET is set).

package storage

import (
	"context"
	"errors"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"
)

type serviceKeyRow struct {
	Name      string `gorm:"column:name;primaryKey"`
	Secret    string `gorm:"column:secret"`
	CreatedAt dbTime `gorm:"column:created_at"`
}

func (serviceKeyRow) TableName() string { return "service_keys" }

func (e *gormExecutor) ServiceKeyGetOrCreate(ctx context.Context, name, candidate string, now time.Time) (string, error) {
	var row serviceKeyRow
	err := e.q(ctx).Where("name = ?", name).Take(&row).Error
	if err == nil {
		return row.Secret, nil
	}
	if !errors.Is(err, gorm.ErrRecordNotFound) {
		return "", e.classify(err)
	}
	// Replicas starting together may all get here: the first insert wins,
	// the others insert nothing, and everyone reads the winner's back.
	if err := e.q(ctx).Clauses(clause.OnConflict{DoNothing: true}).
		Create(&serviceKeyRow{Name: name, Secret: candidate, CreatedAt: newDBTime(now)}).Error; err != nil {
		return "", e.classify(err)
	}
	if err := e.q(ctx).Where("name = ?", name).Take(&row).Error; err != nil {
		return "", e.classify(err)
	}
	return row.Secret, nil
}
