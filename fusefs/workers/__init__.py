"""Fetch worker processes: the cold work of reads (GET, verify, checksum, cache write) off the
FUSE process. :mod:`.pool` runs in the FUSE process, :mod:`.worker` is each worker's program,
:mod:`.protocol` the frames between them."""
