"""A DWCP peer in its own process, for tests that kill or freeze the peer.

    python peer.py receive   -> listens on 127.0.0.1:0, prints the port, receives transfers forever
    python peer.py send PORT -> connects and sends a 30 s benchmark transfer

The key comes from $DWCP_KEY (as a real deployment would pass it)."""

import sys

import dwcp


def main() -> None:
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
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
