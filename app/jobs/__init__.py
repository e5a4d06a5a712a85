"""Jobs: the store (SQLAlchemy), the queue backends and the runner a worker calls."""
