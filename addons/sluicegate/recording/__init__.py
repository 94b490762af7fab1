"""Session recording: session files, the audit log, and the recordable copy of a flow."""
