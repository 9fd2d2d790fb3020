"""Runbook logic for the collection_attempts_invoice_id_fkey incident."""

__version__ = "0.1.0"
