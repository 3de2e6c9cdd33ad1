"""Share-of-Model contracts: terms, signed offers and acceptances, policy and metering.

A pure library: it may use ``crypto`` but never ``marketplace``, a DB or the network.

Modules (import them directly; this package re-exports nothing, so importing it stays cheap):

* :mod:`contracts.terms`       ``Terms``/``JobLimits`` (``som.terms/v1``), money formatting
* :mod:`contracts.offer`       signed ``Offer``, ``Acceptance``, ``Contract``, ``ContractEvent``;
  ``verify_contract``, ``verify_event``, ``verify_chain``, ``contract_status``
* :mod:`contracts.policy`      ``decide(terms, usage, request, now) -> Allow | Deny``;
  ``reserve``/``commit``/``release``
* :mod:`contracts.metering`    ``charge_minor``, ``statement``, ``reconcile``
* :mod:`contracts.records`     the ledger leaf schemas: builders, ``validate_record``, ``parse_record``
* :mod:`contracts.compliance`  ``check_records``: offline check of a ledger against its contracts
* :mod:`contracts.errors`      the ``ContractError`` tree
"""
