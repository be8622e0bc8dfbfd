package storage

import (
	"context"
	"database/sql"
)

// MigrateFailingAfter runs the migrations on db and calls after once each
// statement has been applied; its error stops them there, as a crash would.
func MigrateFailingAfter(ctx context.Context, db *sql.DB, dialect string, after func(version, step int) error) error {
	return migrate(ctx, db, dialect, after)
}

// MigrationStepCounts is, per migration version, its number of statements
// on the dialect.
func MigrationStepCounts(dialect string) map[int]int {
	out := map[int]int{}
	for _, m := range migrations {
		out[m.version] = len(m.statements(dialect))
	}
	return out
}

// ParseMigrationSteps checks that every shipped statement is of a form a
// restart can repeat.
func ParseMigrationSteps() error {
	for _, m := range migrations {
		for _, d := range []string{DialectMySQL, DialectSQLite} {
			for _, s := range m.statements(d) {
				if _, err := parseStep(s); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// ParseMigrationStep parses one statement as a migration step.
func ParseMigrationStep(stmt string) error {
	_, err := parseStep(stmt)
	return err
}
