"""Write hqsam's code as a zip for a Ray runtime_env's py_modules URI (deploy/kuberay-refine-job.yaml).

    pip install --no-deps -e .                  # once, from the repository root, in any venv
    python deploy/package_code.py dist/         # prints dist/hqsam-code-<hash>.zip
    aws s3 cp dist/hqsam-code-<hash>.zip s3://my-bucket/hqsam/

The zip holds exactly what `hqsam <command> --address` ships with a job: the `.py` files of hqsam's
packages under `hqsam/`, nothing else of the checkout. Its name carries a hash of its content, because
Ray caches a py_modules URI by its name: new code needs a new name.
"""

from __future__ import annotations

import sys

from hqsam.pipeline.submission import write_code_archive

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python deploy/package_code.py FOLDER")
    print(write_code_archive(sys.argv[1]))
