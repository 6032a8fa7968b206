"""Reads a Hugging Face cache written by another client (the Rust side), offline, with the
official Python client: scans it (scan_cache_dir reports layout problems as warnings), resolves
the repo's snapshot and its files without the network, and prints a JSON report.

usage: HF_HUB_OFFLINE=1 python hub_cache_check.py CACHE_DIR REPO_ID
"""

import json
import os
import sys

from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download


def main(cache_dir, repo_id):
    info = scan_cache_dir(cache_dir)
    report = {"warnings": [str(w) for w in info.warnings], "repos": {}}
    for repo in info.repos:
        report["repos"][repo.repo_id] = {
            "revisions": {
                rev.commit_hash: {
                    "refs": sorted(rev.refs),
                    "files": {f.file_name: os.path.basename(str(f.blob_path)) for f in rev.files},
                }
                for rev in repo.revisions
            }
        }
    report["snapshot"] = snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    config = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir, local_files_only=True)
    with open(config, "rb") as f:
        report["config_bytes"] = len(f.read())
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
