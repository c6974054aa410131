"""The write path: staged files, their journal, and the upload queue.

A file opened for writing is *staged*: a sparse local file in the staging area (under the cache
directory, never evicted) holds every byte written; bytes not written come from the object it
replaces (its *base*), fetched only when read. ``close`` makes the staged file durable (data
synced, journal row committed) and queues it; the upload queue sends it to the store with a
condition on what this mount last saw there, retries until it succeeds, and keeps it (failed or
conflicting) otherwise. Nothing here talks to pyfuse3.

- :mod:`.ranges`: sorted disjoint byte ranges.
- :mod:`.journal`: the SQLite journal of staged files (what survives ``kill -9``).
- :mod:`.staging`: staged files and the staging directory.
- :mod:`.uploads`: the upload queue: retries, conflicts, waiting (``fsync``, ``sync``).
- :mod:`.writes`: file and namespace operations of a read-write mount (create, write,
  truncate, unlink, rename, mkdir, attributes), on top of :class:`fusefs.fs.FileSystem`.
"""
