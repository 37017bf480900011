#!/bin/sh
# Entry point of the keywarden containers in docker-compose.yml (a STAGING stack on the TEST
# attestation PKI).
#
#   stack.sh setup   one-shot, idempotent: a test PKI into /shared/test-pki, our test contracts
#                    deployed on anvil with the PKI's simulated KMS allowed on-chain, and the
#                    settings that follow them written to /shared/chain.env (the chain's RPC
#                    URL, the DstackKms address and deployment block, the simulated OS image).
#   stack.sh serve   a replica: reads /shared/chain.env; when ONBOARD_FROM is set and the data
#                    directory holds no root keys yet, fetches them from that replica first
#                    (`keywarden kms onboard`, trusting the root CA in ONBOARD_CA and attesting
#                    with the test PKI); then runs `keywarden serve`.
set -eu

# The volume setup shares with the replicas (another directory when run outside compose).
shared="${KEYWARDEN_STACK_SHARED:-/shared}"
pki="$shared/test-pki"
chain_env="$shared/chain.env"
data="${KEYWARDEN_STORAGE__DATA_DIR:-/var/lib/keywarden}"

say() { printf 'stack: %s\n' "$*" >&2; }

setup() {
    rpc="${ANVIL_RPC:-http://anvil:8545}"
    if [ -e "$pki/root_ca.der" ]; then
        say "test PKI already in $pki"
    else
        keywarden dev test-pki init "$pki"
    fi
    if [ -s "$chain_env" ]; then
        say "contracts already deployed: $chain_env"
        return
    fi
    # Written aside and renamed, so a failed deployment leaves no half file behind.
    keywarden dev deploy --rpc "$rpc" --env-file "$chain_env.tmp" --allow-test-kms "$pki"
    mv "$chain_env.tmp" "$chain_env"
    say "deployed; the replicas read $chain_env"
}

# The file `keywarden dev deploy --env-file` wrote: shell assignments (TOML literals quoted),
# exported to keywarden.
load_chain_env() {
    if [ ! -s "$chain_env" ]; then
        say "$chain_env is missing: the setup service has not completed"
        exit 1
    fi
    set -a
    . "$chain_env"
    set +a
}

serve() {
    load_chain_env
    if [ -n "${ONBOARD_FROM:-}" ] && [ ! -e "$data/kms/root-ca.key" ]; then
        say "no root keys in $data: onboarding from $ONBOARD_FROM"
        keywarden kms onboard --from "$ONBOARD_FROM" --ca "${ONBOARD_CA:?ONBOARD_CA names the source root CA}" --test-pki "$pki"
    fi
    exec keywarden serve
}

case "${1:-}" in
    setup) setup ;;
    serve) serve ;;
    *)
        say "usage: stack.sh setup|serve"
        exit 2
        ;;
esac
