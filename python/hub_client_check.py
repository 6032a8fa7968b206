"""Drives a Hub server with the official Python client (huggingface_hub): create a repo, upload a
folder (regular and LFS files), download every file back into a fresh cache, download by commit
hash, and check the errors for a missing file and a wrong token. Prints a JSON report.

usage: HF_ENDPOINT=... HF_HOME=... python hub_client_check.py TOKEN FOLDER
"""

import json
import os
import sys

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError


def main(token, folder):
    api = HfApi(token=token)
    repo_id = "user/client-check"
    api.create_repo(repo_id, private=True)
    api.create_repo(repo_id, exist_ok=True)
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
    report = {"files": {}, "commit": first.oid}
    for name in sorted(os.listdir(folder)):
        path = hf_hub_download(repo_id, name, token=token)
        with open(path, "rb") as f, open(os.path.join(folder, name), "rb") as g:
            report["files"][name] = f.read() == g.read()
    api.upload_file(path_or_fileobj=b"second", path_in_repo="extra.txt", repo_id=repo_id, commit_message="more")
    old = hf_hub_download(repo_id, "config.json", revision=first.oid, token=token)
    report["by_commit"] = open(old, "rb").read() == open(os.path.join(folder, "config.json"), "rb").read()
    report["siblings"] = sorted(s.rfilename for s in api.model_info(repo_id).siblings)
    try:
        hf_hub_download(repo_id, "missing.txt", token=token)
        report["missing"] = "no error"
    except EntryNotFoundError:
        report["missing"] = "EntryNotFoundError"
    try:
        HfApi(token="wrong").model_info(repo_id)
        report["wrong_token"] = "no error"
    except HfHubHTTPError as e:
        report["wrong_token"] = e.response.status_code
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
