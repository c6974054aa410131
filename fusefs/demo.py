"""The demo: an embedded S3-compatible server (moto) seeded with sample files, mounted with
fusefs, read through cold and warm, a file written back, stats shown, unmounted.
``python -m fusefs.demo``."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .testing.servers import moto_s3, s3_client

CREDS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
         "AWS_DEFAULT_REGION": "us-east-1"}


def _read_tree(root: Path, drop_page_cache: bool) -> tuple[int, int, float]:
    files = n = 0
    t0 = time.perf_counter()
    for d, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                if drop_page_cache:  # make the warm pass come from fusefs's block cache
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while chunk := f.read(1 << 20):
                    n += len(chunk)
            files += 1
    return files, n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusefs.demo", description=__doc__)
    ap.add_argument("--files", type=int, default=200, help="number of small sample files")
    ap.add_argument("--big-mib", type=int, default=32, help="size of the one large file, MiB")
    args = ap.parse_args(argv)
    fusefs = [sys.executable, "-m", "fusefs"]
    env = {**os.environ, **CREDS, "FUSEFS_CONFIG_PATH": os.devnull}
    work = Path(tempfile.mkdtemp(prefix="fusefs-demo-"))
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir()
    mounted = False
    try:
        with moto_s3() as server:
            print(f"* embedded S3 server (moto) at {server.endpoint_url}")
            s3 = s3_client(server.endpoint_url)
            s3.create_bucket(Bucket="demo")
            rng = random.Random(0)
            for i in range(args.files):
                s3.put_object(Bucket="demo", Key=f"images/{i:04d}.jpg",
                              Body=rng.randbytes(rng.randrange(20_000, 80_000)))
            s3.put_object(Bucket="demo", Key="data/big.bin",
                          Body=rng.randbytes(args.big_mib << 20))
            s3.put_object(Bucket="demo", Key="README.txt", Body=b"Hello from s3://demo!\n")
            print(f"* seeded s3://demo: {args.files} images, data/big.bin ({args.big_mib} MiB), "
                  "README.txt")
            cmd = [*fusefs, "mount", "s3://demo", str(mnt), "--endpoint-url",
                   server.endpoint_url, "--cache-dir", str(cache), "--cache-size", "1G",
                   "--log-file", str(work / "fusefs.log")]
            print("$ fusefs mount s3://demo", mnt, "--endpoint-url", server.endpoint_url,
                  "--cache-dir", cache, "--cache-size 1G")
            subprocess.run(cmd, env=env, check=True)
            mounted = True
            print(f"$ ls {mnt}\n  " + "  ".join(sorted(os.listdir(mnt))))
            print(f"$ cat {mnt / 'README.txt'}\n  " + (mnt / "README.txt").read_text().strip())
            files, n, cold = _read_tree(mnt, drop_page_cache=False)
            print(f"* cold read of {files} files, {n / 2**20:.1f} MiB: {cold:.2f} s "
                  f"({n / 2**20 / cold:.1f} MiB/s)")
            files, n, warm = _read_tree(mnt, drop_page_cache=True)
            print(f"* warm read (from the block cache): {warm:.2f} s "
                  f"({n / 2**20 / warm:.1f} MiB/s, {cold / warm:.1f}x faster)")
            out = mnt / "results" / "summary.txt"
            print(f"$ mkdir {out.parent}; echo ... > {out}; fusefs sync {mnt}")
            out.parent.mkdir()
            out.write_text(f"read {files} files, {n} bytes\n")
            subprocess.run([*fusefs, "sync", str(mnt)], env=env, check=True,
                           stderr=subprocess.DEVNULL)
            body = s3.get_object(Bucket="demo", Key="results/summary.txt")["Body"].read()
            print("* in the bucket (read with boto3): s3://demo/results/summary.txt = "
                  + body.decode().strip())
            print(f"$ fusefs stats {mnt}")
            subprocess.run([*fusefs, "stats", str(mnt)], env=env, check=True)
            print(f"$ fusefs unmount {mnt}")
            subprocess.run([*fusefs, "unmount", str(mnt)], env=env, check=True)
            mounted = False
            print("* done: unmounted; the block cache stays in", cache, "(removed now)")
        return 0
    finally:
        if mounted:
            for flag in ("-u", "-uz"):
                if subprocess.run(["fusermount3", flag, str(mnt)],
                                  capture_output=True).returncode == 0:
                    break
        time.sleep(0.2)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
