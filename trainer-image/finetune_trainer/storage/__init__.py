"""What every stage reads and writes through: S3, the content-addressed caches in it, and the
egress checks on each connection and local path."""
