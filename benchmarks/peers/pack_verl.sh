#!/bin/bash
# Packs what verl 0.9.1 needs on the GPU machines beyond Tandem's install
# (../shared/tools/gpu-vllm) and the peers wheels (.gpu-wheels/peers) into two folders of at
# most 56 MiB, one per call: .gpu-wheels/verl1 (the first 56 MiB of ray's 79 MB wheel) and
# .gpu-wheels/verl2 (the rest of ray; ray[default]'s, verl's and TransferQueue's missing
# dependencies; site/: transformers 5.9.0, tokenizers 0.22.2 and tensordict 0.10.0, the
# versions verl pins, installed on the GPU machine into the folder first on verl's PYTHONPATH).
# Run it here, from the repo root; install_verl.sh unpacks on the GPU machine.
set -euo pipefail
out=.gpu-wheels; tmp=$out/verl.tmp
rm -rf "$out/verl1" "$out/verl2" "$tmp"; mkdir -p "$out/verl1" "$tmp/site"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64
      --platform any)
dl() { python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp "${plat[@]}" "$@"; }
# ray[default] 2.60.0, less what the GPU image and Tandem's vLLM wheels already hold
dl -d "$tmp" ray==2.60.0 virtualenv==21.15.11 py-spy==0.4.3 distlib==0.4.4 google-auth==2.63.0 \
  google-api-core==2.44.0 colorful==0.5.8 pyasn1-modules==0.4.2 opencensus==0.11.4 \
  python-discovery==1.9.6 platformdirs==4.14.9 pyasn1==0.6.5 smart-open==9.0.2 proto-plus==1.29.0 \
  aiohttp-cors==0.8.1 opencensus-context==0.1.3 opentelemetry-exporter-prometheus==0.66b2
# verl and what its GRPO path imports that the machine lacks (datasets' set: the peers' versions)
dl -d "$tmp" verl==0.9.1 transferqueue==0.1.11 codetiming==1.4.0 torchdata==0.11.0 pylatexenc==2.11 \
  lazy-importer==0.1.0 importlib-metadata==10.2.0 datasets==5.2.0 multiprocess==0.70.19 \
  fsspec==2026.9.0 tzdata==2026.6
# verl's pins, for the PYTHONPATH-first folder (transformers 5.9 checks tokenizers<=0.23.0)
dl -d "$tmp/site" transformers==5.9.0 tokenizers==0.22.2 tensordict==0.10.0
ray=$(cd "$tmp" && ls ray-2.60.0-*.whl)
split -b 56m "$tmp/$ray" "$tmp/$ray.part_"
mv "$tmp/$ray.part_aa" "$out/verl1/"; rm "$tmp/$ray"
mv "$tmp" "$out/verl2"
du -sh "$out/verl1" "$out/verl2"
for d in "$out/verl1" "$out/verl2"; do
  bytes=$(find "$d" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
  [ "$bytes" -le $((56 * 1024 * 1024)) ] || { echo "$d: $bytes bytes, over 56 MiB"; exit 1; }
done
echo "wheels: $(ls "$out"/verl2/*.whl "$out"/verl2/site/*.whl | wc -l) + ray in 2 parts"
