"""A DWCP peer in its own process, for tests that kill or freeze the peer.

    python peer.py receive   -> listens on 127.0.0.1:0, prints the port, receives transfers forever
    python peer.py send PORT -> connects and sends a 30 s benchmark transfer
    python peer.py digest    -> listens on 127.0.0.1:0, prints the port; every session it accepts
                                answers each transfer with the SHA-256 of what arrived, until it fails
                                ($DWCP_PEER_HOST: listen there instead of 127.0.0.1)

The key comes from $DWCP_KEY (as a real deployment would pass it)."""

import hashlib
import sys
import threading

import dwcp


def answer_digests(s: "dwcp.Session") -> None:
    with s:
        try:
            while True:
                s.send(hashlib.sha256(s.recv()).digest())
        except dwcp.DWCPError:
            return


def main() -> None:
    import logging
    import os
    if os.environ.get("DWCP_PEER_LOG"):
        logging.basicConfig(filename=os.environ["DWCP_PEER_LOG"], level=logging.DEBUG,
                            format="%(asctime)s %(threadName)s %(name)s %(message)s")
    role = sys.argv[1]
    if role == "receive":
        with dwcp.listen(("127.0.0.1", 0)) as lis:
            print(lis.address[1], flush=True)
            with lis.accept(timeout_s=30) as s:
                buf = bytearray(64 << 20)
                while True:
                    s.recv_into(buf)
    elif role == "send":
        with dwcp.connect(("127.0.0.1", int(sys.argv[2])), streams=4, chunk_bytes=1 << 20) as s:
            print("connected", flush=True)
            s.send_for(bytearray(64 << 20), 30.0)
    elif role == "digest":
        host = os.environ.get("DWCP_PEER_HOST", "127.0.0.1")  # a netlab host's address, for WAN tests
        with dwcp.listen((host, 0), timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 30.0) as lis:
            print(lis.address[1], flush=True)
            while True:
                threading.Thread(target=answer_digests, args=(lis.accept(),), daemon=True).start()
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
