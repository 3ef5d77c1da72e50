"""Write the RayCluster (ray.io/v1) schema that tests/test_deployments.py validates the KubeRay example against.

The schema is the openAPIV3Schema of KubeRay's CRD (Apache-2.0, github.com/ray-project/kuberay,
ray-operator/config/crd/bases/ray.io_rayclusters.yaml), without its descriptions, as gzipped JSON
(no timestamp, so the bytes depend only on the CRD). To refresh it for another KubeRay release:

    python tests/data/kuberay/extract_schema.py ray.io_rayclusters.yaml tests/data/kuberay/raycluster-v1.schema.json.gz
"""

from __future__ import annotations

import gzip
import json
import sys

import yaml


def without_descriptions(node):
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def main(crd_path: str, out_path: str) -> None:
    with open(crd_path, encoding="utf-8") as fh:
        crd = yaml.safe_load(fh)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = without_descriptions(version["schema"]["openAPIV3Schema"])
    data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    with open(out_path, "wb") as fh:
        fh.write(gzip.compress(data, compresslevel=9, mtime=0))


if __name__ == "__main__":
    main(*sys.argv[1:])
