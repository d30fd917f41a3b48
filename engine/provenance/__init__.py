"""What makes a job's records evidence: the hash-chained audit log and manifest (audit), what the
audit log and the outbox's journal share (chain), the journal and signed heads (trust), the lab's
signing process (signer), C2PA Content Credentials (credentials), and checking all of it after
the fact (verification).

Stands on the base modules only: writing and checking a record needs no model, job spec or
stage."""
