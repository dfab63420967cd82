-- The original handoff manager's database (lsst-dm/dbb_buffmngrs_handoff), as its SQLAlchemy
-- declaratives create it on PostgreSQL (BigInteger primary keys: BIGSERIAL).
CREATE TABLE files (
	id BIGSERIAL NOT NULL, 
	relpath VARCHAR NOT NULL, 
	filename VARCHAR NOT NULL, 
	checksum VARCHAR NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	created_on TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	held_on TIMESTAMP WITHOUT TIME ZONE, 
	deleted_on TIMESTAMP WITHOUT TIME ZONE, 
	PRIMARY KEY (id)
);
CREATE TABLE transfer_batches (
	id BIGSERIAL NOT NULL, 
	pre_start_time TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	pre_duration INTERVAL NOT NULL, 
	trans_start_time TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	trans_duration INTERVAL, 
	post_start_time TIMESTAMP WITHOUT TIME ZONE, 
	post_duration INTERVAL, 
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
