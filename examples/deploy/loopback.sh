#!/usr/bin/env bash
# The deployment of docs/flower.md ("A real deployment") on one machine, command for command: certificates,
# node authentication, one SuperLink with durable state, three SuperNodes (client ids 0, 1, 2), the run.
# Every process started here is stopped on exit, whatever happened.
#
#   examples/deploy/loopback.sh CONFIG WORKDIR [PARTIES]
#
# CONFIG: a fedlora config with federation.num_clients = 3. WORKDIR: where the certificates, keys, logs,
# SuperLink database, app and run folder go. PARTIES: a folder with each organisation's own files,
# orgN/train.csv and orgN/eval.csv (N = 0, 1, 2): SuperNode N trains on all of orgN/train.csv and evaluates on
# orgN/eval.csv; without it the SuperNodes train on the config's data. VENV (default: this checkout's .venv):
# the virtual environment that holds fedlora and flwr. Ports 9091 (SuperLink) and 9094-9096 (SuperNodes) must
# be free.
set -euo pipefail
CONFIG=$(realpath "$1")
PARTIES=${3:+$(realpath "$3")}
VENV=${VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.venv}
mkdir -p "$2" && cd "$2"

pids=()
tree() {  # a process and all it started (the SuperLink starts its SuperExec in a session of its own)
    echo "$1"
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}
stop_all() {
    local all=()
    for pid in "${pids[@]}"; do all+=($(tree "$pid")); done
    [ ${#all[@]} -eq 0 ] || kill -9 "${all[@]}" 2>/dev/null || true
}
trap stop_all EXIT

# -- docs/flower.md, "A real deployment" ---------------------------------------------------------------
export PATH="$VENV/bin:$PATH"
export FLWR_HOME="$PWD/flwr-home"

# the server: a certificate authority and a TLS certificate for the SuperLink's address
mkdir -p certs keys "$FLWR_HOME"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=fedlora CA" -keyout certs/ca.key -out certs/ca.crt
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout certs/server.key -out certs/server.csr
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\n" > certs/server.ext
openssl x509 -req -in certs/server.csr -CA certs/ca.crt -CAkey certs/ca.key -CAcreateserial -days 30 -extfile certs/server.ext -out certs/server.pem

# the SuperLink: TLS, node authentication, its state in a database that outlives a restart, one port
flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key --enable-supernode-auth --disable-runtime-dependency-installation --database "$PWD/superlink.db" --host 127.0.0.1 --port 9091 > superlink.log 2>&1 &
pids+=($!)

# the connection to the SuperLink's Control API (an absolute certificate path), before any flwr command
cat >> "$FLWR_HOME/config.toml" <<TOML
[superlink.fedlora-link]
address = "127.0.0.1:9091"
root-certificates = "$PWD/certs/ca.crt"
TOML
until flwr ls fedlora-link > /dev/null 2>&1; do sleep 1; done  # the SuperLink is up

# each organisation: an EC key pair whose public key is registered, a SuperNode with a port of its own, and
# with PARTIES its own training and evaluation files
for i in 0 1 2; do
    ssh-keygen -q -t ecdsa -b 384 -N "" -f keys/org$i
    flwr supernode register keys/org$i.pub fedlora-link
    own=""; [ -z "$PARTIES" ] || own=" data-path=\"$PARTIES/org$i/train.csv\" eval-path=\"$PARTIES/org$i/eval.csv\""
    flower-supernode --superlink 127.0.0.1:9091 --root-certificates "$PWD/certs/ca.crt" --auth-supernode-private-key keys/org$i --port $((9094 + i)) --max-retries 60 --node-config "partition-id=$i num-partitions=3$own" > supernode$i.log 2>&1 &
    pids+=($!)
done

# the run: an app whose run config is the fedlora config, with absolute paths; exits non-zero if it fails
fedlora flower init my-app "$CONFIG" --out "$PWD/run"
fedlora flower run my-app fedlora-link
