"""Audit trail of every access to patient data: who, from where, which route, which cases
(as keyed HMACs), with what result -- never text, never raw case ids.

Layout: chain.py (record sealing and verification of the hash chain), case_ids.py (the HMAC
key and case-id hashing), writer.py (the append-only file: a writer thread, group fsync, locking,
rotation), middleware.py (one record per audited request), context.py (what routes tell it),
cli.py (`medserve audit verify|rotate`).
"""
