-- hdfmgr schema 3, unversioned, as created by hdfmgr at commit 95c88e1 (2026-11-28 Backlog on a partial index: status in ~110 ms and a metrics scrape in ~5 ms on ).
-- The statements that commit's create_schema ran on PostgreSQL 15 (from peewee's log); kept to test the migration from it.
CREATE TABLE IF NOT EXISTS "batches" ("id" SERIAL NOT NULL PRIMARY KEY, "source" VARCHAR(128) NOT NULL, "staging_dir" TEXT NOT NULL, "started_at" DOUBLE PRECISION NOT NULL, "finished_at" DOUBLE PRECISION, "files" INTEGER NOT NULL, "bytes" BIGINT NOT NULL, "hash_seconds" DOUBLE PRECISION NOT NULL, "prepare_seconds" DOUBLE PRECISION, "transfer_started" DOUBLE PRECISION, "transfer_seconds" DOUBLE PRECISION, "commit_started" DOUBLE PRECISION, "commit_seconds" DOUBLE PRECISION, "rate" DOUBLE PRECISION, "status" VARCHAR(16) NOT NULL, "error_class" VARCHAR(16), "returncode" INTEGER, "stderr" TEXT, "command" TEXT, "committed" INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS "batches_source_started_at" ON "batches" ("source", "started_at");
CREATE INDEX IF NOT EXISTS "batches_status" ON "batches" ("status");
CREATE INDEX IF NOT EXISTS "batches_source_finished_at" ON "batches" ("source", "finished_at");
CREATE TABLE IF NOT EXISTS "files" ("id" SERIAL NOT NULL PRIMARY KEY, "source" VARCHAR(128) NOT NULL, "relpath" BYTEA NOT NULL, "name" TEXT NOT NULL, "size" BIGINT NOT NULL, "mtime_ns" BIGINT NOT NULL, "inode" BIGINT NOT NULL, "checksum" VARCHAR(128), "state" VARCHAR(16) NOT NULL, "attempts" INTEGER NOT NULL, "next_try" DOUBLE PRECISION NOT NULL, "error_class" VARCHAR(16), "last_error" TEXT, "held_as" TEXT, "detected_at" DOUBLE PRECISION NOT NULL, "ready_at" DOUBLE PRECISION, "committed_at" DOUBLE PRECISION, "held_at" DOUBLE PRECISION, "updated_at" DOUBLE PRECISION NOT NULL, "last_batch" INTEGER);
CREATE INDEX IF NOT EXISTS "files_source_state" ON "files" ("source", "state");
CREATE INDEX IF NOT EXISTS "files_source_relpath" ON "files" ("source", "relpath");
CREATE INDEX IF NOT EXISTS "files_state_updated_at" ON "files" ("state", "updated_at");
CREATE INDEX IF NOT EXISTS "files_source_committed_at" ON "files" ("source", "committed_at");
CREATE INDEX IF NOT EXISTS "files_committed_at" ON "files" ("committed_at");
CREATE INDEX IF NOT EXISTS "files_source_detected_at" ON "files" ("source", "detected_at");
CREATE INDEX IF NOT EXISTS "files_detected_at" ON "files" ("detected_at");
CREATE INDEX IF NOT EXISTS "files_waiting" ON "files" ("source", "detected_at") WHERE "state" IN ('ready', 'failed', 'staging', 'committing');
CREATE TABLE IF NOT EXISTS "attempts" ("id" SERIAL NOT NULL PRIMARY KEY, "batch_id" INTEGER NOT NULL, "file_id" INTEGER NOT NULL, "outcome" VARCHAR(16) NOT NULL, "error" TEXT, FOREIGN KEY ("batch_id") REFERENCES "batches" ("id") ON DELETE CASCADE, FOREIGN KEY ("file_id") REFERENCES "files" ("id") ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS "attempts_batch_id" ON "attempts" ("batch_id");
CREATE INDEX IF NOT EXISTS "attempts_file_id" ON "attempts" ("file_id");
