-- The original handoff manager's database (lsst-dm/dbb_buffmngrs_handoff), as its SQLAlchemy
-- declaratives create it on SQLite, with a few rows of history: times are naive local times,
-- durations (Interval) are DATETIME offsets from 1970-01-01, status 0 ok, 62 timeout, 121 a
-- command exited non-zero.
CREATE TABLE files (
	id INTEGER NOT NULL, 
	relpath VARCHAR NOT NULL, 
	filename VARCHAR NOT NULL, 
	checksum VARCHAR NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	created_on DATETIME NOT NULL, 
	held_on DATETIME, 
	deleted_on DATETIME, 
	PRIMARY KEY (id)
);
CREATE TABLE transfer_batches (
	id INTEGER NOT NULL, 
	pre_start_time DATETIME NOT NULL, 
	pre_duration DATETIME NOT NULL, 
	trans_start_time DATETIME NOT NULL, 
	trans_duration DATETIME, 
	post_start_time DATETIME, 
	post_duration DATETIME, 
	size_bytes INTEGER, 
	rate_mbytes_per_sec NUMERIC, 
	status INTEGER NOT NULL, 
	err_msg TEXT, 
	PRIMARY KEY (id)
);
CREATE TABLE file_transfer_attempts (
	files_id BIGINT, 
	batch_id BIGINT, 
	FOREIGN KEY(files_id) REFERENCES files (id), 
	FOREIGN KEY(batch_id) REFERENCES transfer_batches (id)
);
