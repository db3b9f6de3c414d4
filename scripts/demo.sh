#!/usr/bin/env bash
# The README's main command: a demo mirror between two local registries.
#   1. installs dependencies and builds imagemirror;
#   2. starts two CNCF distribution registries on 127.0.0.1:15000 (source) and :15001 (destination);
#   3. seeds the source with a small image set (OCI and Docker schema2, a shared base layer);
#   4. runs `imagemirror mirror -f examples/demo.yaml`;
#   5. shows source and destination digests side by side, and fails if any differ.
# The registries are stopped on exit. Re-runnable: each run starts from empty registries.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
SRC=127.0.0.1:15000
DST=127.0.0.1:15001
WORK="$REPO_DIR/.demo"

scripts/install-deps.sh
cargo build --locked --bin imagemirror
BIN="$REPO_DIR/target/debug/imagemirror"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

start_registry() { # name addr
  local dir="$WORK/$1"
  mkdir -p "$dir/data"
  if curl -s -o /dev/null "http://$2/v2/"; then
    echo "demo: something already listens on $2; stop it and run again" >&2
    exit 1
  fi
  cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $2
  secret: imagemirror-demo
YAML
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$2/v2/" && return 0
    sleep 0.1
  done
  echo "demo: registry on $2 did not start; see $dir/registry.log" >&2
  exit 1
}

push_blob() { # repo file -> prints "digest size"
  local repo=$1 file=$2 digest size loc sep
  digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
  size=$(stat -c %s "$file")
  loc=$(curl -fsS -D - -o /dev/null -X POST "http://$SRC/v2/$repo/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  [[ "$loc" == http* ]] || loc="http://$SRC$loc"
  sep='?'; [[ "$loc" == *\?* ]] && sep='&'
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$file" "$loc${sep}digest=$digest"
  echo "$digest $size"
}

push_image() { # repo tag flavor(oci|docker) layer-files...
  local repo=$1 tag=$2 flavor=$3; shift 3
  local mt cmt lmt cfg layers="" d s
  if [ "$flavor" = oci ]; then
    mt=application/vnd.oci.image.manifest.v1+json; cmt=application/vnd.oci.image.config.v1+json
    lmt=application/vnd.oci.image.layer.v1.tar+gzip
  else
    mt=application/vnd.docker.distribution.manifest.v2+json; cmt=application/vnd.docker.container.image.v1+json
    lmt=application/vnd.docker.image.rootfs.diff.tar.gzip
  fi
  printf '{"architecture":"amd64","os":"linux","config":{"Labels":{"demo":"%s:%s"}}}' "$repo" "$tag" >"$WORK/config.json"
  read -r d s < <(push_blob "$repo" "$WORK/config.json")
  cfg="{\"mediaType\":\"$cmt\",\"digest\":\"$d\",\"size\":$s}"
  for f in "$@"; do
    read -r d s < <(push_blob "$repo" "$f")
    layers="$layers${layers:+,}{\"mediaType\":\"$lmt\",\"digest\":\"$d\",\"size\":$s}"
  done
  printf '{"schemaVersion":2,"mediaType":"%s","config":%s,"layers":[%s]}' "$mt" "$cfg" "$layers" >"$WORK/manifest.json"
  curl -fsS -o /dev/null -X PUT -H "Content-Type: $mt" --data-binary "@$WORK/manifest.json" "http://$SRC/v2/$repo/manifests/$tag"
}

digest_of() { # host repo tag
  curl -fsS -I -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json' \
    "http://$1/v2/$2/manifests/$3" 2>/dev/null | tr -d '\r' | awk 'tolower($1)=="docker-content-digest:"{print $2}'
}

rm -rf "$WORK"
mkdir -p "$WORK"
start_registry source "$SRC"
start_registry destination "$DST"

echo "demo: seeding $SRC"
head -c $((2 * 1024 * 1024)) /dev/urandom >"$WORK/base.bin"
head -c $((512 * 1024)) /dev/urandom >"$WORK/app-1.0.bin"
head -c $((768 * 1024)) /dev/urandom >"$WORK/app-1.1.bin"
head -c $((256 * 1024)) /dev/urandom >"$WORK/tools.bin"
push_image demo/app 1.0 oci "$WORK/base.bin" "$WORK/app-1.0.bin"
push_image demo/app 1.1 oci "$WORK/base.bin" "$WORK/app-1.1.bin"
push_image demo/tools latest docker "$WORK/base.bin" "$WORK/tools.bin"

echo "demo: imagemirror mirror -f examples/demo.yaml"
"$BIN" mirror -f examples/demo.yaml

echo
printf '%-22s %-73s %-73s %s\n' IMAGE SOURCE DESTINATION SAME
status=0
for pair in "demo/app mirror/app 1.0" "demo/app mirror/app 1.1" "demo/tools mirror/tools latest"; do
  read -r srepo drepo tag <<<"$pair"
  s=$(digest_of "$SRC" "$srepo" "$tag")
  d=$(digest_of "$DST" "$drepo" "$tag")
  same=yes
  if [ -z "$s" ] || [ "$s" != "$d" ]; then same=NO; status=1; fi
  printf '%-22s %-73s %-73s %s\n' "$drepo:$tag" "${s:-missing}" "${d:-missing}" "$same"
done
if [ $status -ne 0 ]; then
  echo "demo: FAILED: destination differs from source" >&2
else
  echo "demo: ok, every destination tag has its source's digest"
fi
exit $status
