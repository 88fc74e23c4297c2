"""The router against how users actually phrase requests, in German and English.

Each case names the intent and the key slot values. A value starting with ``~`` must be
contained in the extracted value; any other value must be equal. Both compare case-folded.
The phrasings were written before the rules: word order, politeness, du/Sie, typos, extra
words and telegram style all occur. The negatives must not match any intent.
"""

from __future__ import annotations

from collections import Counter

import pytest

from actors.router import IntentCatalogue, IntentRouter
from actors.settings import CONFIG_DIR, RouterSettings

Case = tuple[str, str, dict[str, str]]

INVOICE = "invoice.export_and_mail"
MAIL = "mail.send"
CUSTOMER = "customer.lookup"
REPORT = "report.analyse"
DOCUMENT = "document.download"
TICKET = "ticket.create"
MEETING = "meeting.schedule"
WEB = "web.open"

CORPUS: list[Case] = [
    # --- invoice.export_and_mail -------------------------------------------------------
    ("Finde in DATEV die letzte Rechnung für Firma X, exportiere PDF, sende per Mail an "
     "anna@kunde.de", INVOICE, {"customer": "Firma X", "recipient": "anna@kunde.de"}),
    ("Könnten Sie bitte die letzte Rechnung von Müller GmbH aus DATEV als PDF exportieren "
     "und an buchhaltung@mueller.de schicken?", INVOICE,
     {"customer": "Müller GmbH", "recipient": "buchhaltung@mueller.de"}),
    ("Please export the latest invoice for ACME AG as PDF and email it to john@acme.com",
     INVOICE, {"customer": "ACME AG", "recipient": "john@acme.com"}),
    ("Schick mir die aktuelle Rechnung von Contoso Ltd als PDF an finance@contoso.com",
     INVOICE, {"customer": "Contoso Ltd", "recipient": "finance@contoso.com"}),
    ("kannst du die lezte rechnung für firma Becker exportieren und per mail an "
     "tom@becker.de senden", INVOICE, {"customer": "firma Becker", "recipient": "tom@becker.de"}),
    ("Invoice for Globex Inc: export the most recent one to PDF and send it to "
     "billing@globex.com please", INVOICE,
     {"customer": "Globex Inc", "recipient": "billing@globex.com"}),
    ("Bitte aus DATEV die neueste Rechnung des Kunden Schulze KG ziehen, als PDF exportieren "
     "und an s.schulze@schulze-kg.de mailen", INVOICE,
     {"customer": "Schulze KG", "recipient": "s.schulze@schulze-kg.de"}),
    ("Send the last invoice of Initech LLC as a PDF to peter@initech.com", INVOICE,
     {"customer": "Initech LLC", "recipient": "peter@initech.com"}),
    ("Exportier mal die letzte Rechnung für Firma Hoffmann als PDF und schick sie an "
     "lisa@hoffmann.de", INVOICE, {"customer": "Firma Hoffmann", "recipient": "lisa@hoffmann.de"}),
    ("Rechnung Firma X letzte exportieren PDF mail an anna@kunde.de", INVOICE,
     {"customer": "Firma X", "recipient": "anna@kunde.de"}),
    ("Hey, could you grab the latest invoice from DATEV for Umbrella Corp, export it as PDF "
     "and mail it to ceo@umbrella.com? Thanks!", INVOICE,
     {"customer": "Umbrella Corp", "recipient": "ceo@umbrella.com"}),
    ("Die letzte Faktura vom Kunden Weber AG bitte als PDF an weber@weber-ag.de senden",
     INVOICE, {"customer": "Weber AG", "recipient": "weber@weber-ag.de"}),
    ("Hallo! Ich bräuchte die letzte Rechnung der Firma Krause als PDF, bitte an "
     "k.krause@krause.de schicken", INVOICE,
     {"customer": "Firma Krause", "recipient": "k.krause@krause.de"}),
    ("export latest invoice Contoso Ltd pdf -> mail ap@contoso.com", INVOICE,
     {"customer": "Contoso Ltd", "recipient": "ap@contoso.com"}),
    ("Mail the newest invoice for Wayne Enterprises Inc to bruce@wayne.com as PDF", INVOICE,
     {"customer": "Wayne Enterprises Inc", "recipient": "bruce@wayne.com"}),
    # --- mail.send ---------------------------------------------------------------------
    ('Send an email to bob@firma.de with subject "Offer"', MAIL,
     {"recipient": "bob@firma.de", "subject": "Offer"}),
    ('Schreibe eine E-Mail an anna@kunde.de mit dem Betreff "Angebot" und dem Text '
     '"Anbei das Angebot"', MAIL,
     {"recipient": "anna@kunde.de", "subject": "Angebot", "body": "Anbei das Angebot"}),
    ("Bitte schick eine Mail an team@example.com: Meeting fällt heute aus", MAIL,
     {"recipient": "team@example.com", "body": "Meeting fällt heute aus"}),
    ("Mail an bob@firma.de, Betreff: Rückruf, Text: Bitte ruf mich an", MAIL,
     {"recipient": "bob@firma.de", "subject": "Rückruf", "body": "Bitte ruf mich an"}),
    ("Could you please email jane.doe@example.org about the quarterly numbers", MAIL,
     {"recipient": "jane.doe@example.org", "subject": "~quarterly numbers"}),
    ("Kannst du bitte an max@mustermann.de eine Nachricht schicken, dass ich später komme",
     MAIL, {"recipient": "max@mustermann.de", "body": "~später komme"}),
    ("Send bob@firma.de a quick mail saying the server is back up", MAIL,
     {"recipient": "bob@firma.de", "body": "~server is back up"}),
    ("E-Mail an support@vendor.com senden, Betreff „Lizenzverlängerung“", MAIL,
     {"recipient": "support@vendor.com", "subject": "Lizenzverlängerung"}),
    ("pls send mail to ops@corp.io subject: deploy done", MAIL,
     {"recipient": "ops@corp.io", "subject": "deploy done", "body": ""}),
    ("Schreib dem Kunden eine mail an kunde@shop.de mit betreff Lieferverzug", MAIL,
     {"recipient": "kunde@shop.de", "subject": "Lieferverzug"}),
    ("Email sarah@contoso.com: the contract is signed", MAIL,
     {"recipient": "sarah@contoso.com", "body": "~contract is signed"}),
    ("Sende bitte eine Emial an info@beispiel.de", MAIL, {"recipient": "info@beispiel.de"}),
    ("Schreib an hr@firma.de dass ich morgen Urlaub habe", MAIL,
     {"recipient": "hr@firma.de", "body": "~morgen Urlaub"}),
    ("Send a message to lisa@example.com saying I'll be late", MAIL,
     {"recipient": "lisa@example.com", "body": "I'll be late"}),
    ("Bitte eine E-Mail an chef@firma.de schreiben, Betreff: Krankmeldung", MAIL,
     {"recipient": "chef@firma.de", "subject": "Krankmeldung"}),
    # --- customer.lookup ---------------------------------------------------------------
    ("Suche den Kunden Müller GmbH im CRM", CUSTOMER, {"customer": "Müller GmbH"}),
    ("Look up customer Contoso Ltd in the CRM", CUSTOMER, {"customer": "Contoso Ltd"}),
    ("Könnten Sie mir bitte die Kundendaten von ACME AG heraussuchen?", CUSTOMER,
     {"customer": "ACME AG"}),
    ("Find the client Initech LLC and show me their contact details", CUSTOMER,
     {"customer": "Initech LLC"}),
    ("Wer ist Ansprechpartner bei der Firma Becker? Schau bitte im CRM nach", CUSTOMER,
     {"customer": "Firma Becker"}),
    ("Zeig mir die Stammdaten vom Kunden Schulze KG", CUSTOMER, {"customer": "Schulze KG"}),
    ("customer lookup: Globex Inc", CUSTOMER, {"customer": "Globex Inc"}),
    ("Hast du Infos zum Kunden Weber?", CUSTOMER, {"customer": "Weber"}),
    ("Please check our CRM for the account Umbrella Corp", CUSTOMER,
     {"customer": "Umbrella Corp"}),
    ("Suche Kundin Hoffmann & Söhne GmbH", CUSTOMER, {"customer": "Hoffmann & Söhne GmbH"}),
    ("Open the customer record for Stark Industries", CUSTOMER,
     {"customer": "Stark Industries"}),
    ("Kunde Meier AG nachschlagen", CUSTOMER, {"customer": "Meier AG"}),
    ("suche kunde müller gmbh im crm", CUSTOMER, {"customer": "müller gmbh"}),
    ("Könntest du mal im CRM nach der Firma Schneider schauen?", CUSTOMER,
     {"customer": "Firma Schneider"}),
    ("Show me the customer details for Acme Corp", CUSTOMER, {"customer": "Acme Corp"}),
    ("Ich suche Infos über den Kunden Fischer AG", CUSTOMER, {"customer": "Fischer AG"}),
    # --- report.analyse ----------------------------------------------------------------
    ("Analysiere Q3 Churn", REPORT, {"topic": "Churn", "period": "Q3"}),
    ("Könnten Sie bitte den Umsatz im letzten Monat analysieren?", REPORT,
     {"topic": "Umsatz", "period": "last month"}),
    ("Analyze churn for Q3 2024", REPORT, {"topic": "churn", "period": "Q3 2024"}),
    ("Wie hat sich die Conversion Rate im Oktober entwickelt? Bitte auswerten", REPORT,
     {"topic": "Conversion Rate", "period": "October"}),
    ("Please run an analysis of customer churn for last quarter", REPORT,
     {"topic": "customer churn", "period": "last quarter"}),
    ("Auswertung Kündigungen 2024", REPORT, {"topic": "Kündigungen", "period": "2024"}),
    ("Kannst du mal die Support-Tickets vom letzten Quartal analysieren?", REPORT,
     {"topic": "Support-Tickets", "period": "last quarter"}),
    ("Analyse revenue by region for March 2025", REPORT,
     {"topic": "revenue by region", "period": "March 2025"}),
    ("Ich brauche einen Bericht über die Retourenquote im zweiten Quartal", REPORT,
     {"topic": "Retourenquote", "period": "Q2"}),
    ("Evaluate the marketing spend this year", REPORT,
     {"topic": "marketing spend", "period": "this year"}),
    ("Analysier bitte die Lieferzeiten für Januar", REPORT,
     {"topic": "Lieferzeiten", "period": "January"}),
    ("Churn-Analyse für Q4 bitte", REPORT, {"topic": "Churn", "period": "Q4"}),
    ("Analysiere bitte den Umsatz", REPORT, {"topic": "Umsatz", "period": "latest"}),
    ("Wie haben sich die Umsätze im Q2 entwickelt?", REPORT,
     {"topic": "Umsätze", "period": "Q2"}),
    ("Give me an analysis of the support ticket volume for last month", REPORT,
     {"topic": "support ticket volume", "period": "last month"}),
    ("Bitte werte die Kosten für 2023 aus", REPORT, {"topic": "Kosten", "period": "2023"}),
    # --- document.download -------------------------------------------------------------
    ("Download the October bank statement", DOCUMENT,
     {"document": "bank statement", "period": "October"}),
    ("Lade bitte den Kontoauszug für Oktober herunter", DOCUMENT,
     {"document": "Kontoauszug", "period": "October"}),
    ("Kannst du mir die Gehaltsabrechnung vom letzten Monat runterladen?", DOCUMENT,
     {"document": "Gehaltsabrechnung", "period": "last month"}),
    ("Please download the Q2 2024 VAT report", DOCUMENT,
     {"document": "VAT report", "period": "Q2 2024"}),
    ("Hol mir den Jahresabschluss 2023 aus dem Portal", DOCUMENT,
     {"document": "Jahresabschluss", "period": "2023"}),
    ("Download last month's payroll report", DOCUMENT,
     {"document": "payroll report", "period": "last month"}),
    ("Ich brauche den Kontoauszug von März als Download", DOCUMENT,
     {"document": "Kontoauszug", "period": "March"}),
    ("Could you fetch the September statement from the bank portal?", DOCUMENT,
     {"document": "~statement", "period": "September"}),
    ("Bitte den Lohnnachweis für Q1 herunterladen", DOCUMENT,
     {"document": "Lohnnachweis", "period": "Q1"}),
    ("download the contract PDF for 2024", DOCUMENT,
     {"document": "~contract", "period": "2024"}),
    ("Runterladen: Kontoauszüge Januar 2025", DOCUMENT,
     {"document": "~Kontoauszüge", "period": "January 2025"}),
    ("Lad den aktuellen Kontoauszug runter", DOCUMENT, {"document": "~Kontoauszug"}),
    ("I need the bank statement for November downloaded", DOCUMENT,
     {"document": "bank statement", "period": "November"}),
    ("Lade mir bitte die Lohnabrechnung Dezember herunter", DOCUMENT,
     {"document": "Lohnabrechnung", "period": "December"}),
    ("Download the payslip from last month please", DOCUMENT,
     {"document": "payslip", "period": "last month"}),
    # --- ticket.create -----------------------------------------------------------------
    ("Erstelle ein Ticket: Drucker im 2. OG defekt", TICKET,
     {"summary": "Drucker im 2. OG defekt"}),
    ("Bitte ein Ticket aufmachen wegen VPN-Ausfall im Homeoffice", TICKET,
     {"summary": "VPN-Ausfall im Homeoffice"}),
    ("Open a ticket: laptop won't boot after update", TICKET,
     {"summary": "laptop won't boot after update"}),
    ("Der Drucker im 2. OG ist kaputt, kannst du bitte ein Ticket anlegen?", TICKET,
     {"summary": "~Drucker im 2. OG ist kaputt"}),
    ("Please create a support ticket because the Outlook calendar is not syncing", TICKET,
     {"summary": "Outlook calendar is not syncing"}),
    ("Ticket erstellen: Beamer im Konferenzraum flackert", TICKET,
     {"summary": "Beamer im Konferenzraum flackert"}),
    ("Kannst du ein Störungsticket für den Kaffeeautomaten aufmachen", TICKET,
     {"summary": "~Kaffeeautomaten"}),
    ("raise an incident: email server down in Berlin office", TICKET,
     {"summary": "email server down in Berlin office"}),
    ("Neues Ticket – Monitor flackert seit heute morgen", TICKET,
     {"summary": "~Monitor flackert"}),
    ("Ich kann mich nicht ins SAP einloggen, bitte Ticket eröffnen", TICKET,
     {"summary": "~SAP einloggen"}),
    ("File a ticket for the broken coffee machine on floor 3", TICKET,
     {"summary": "~broken coffee machine"}),
    ("Hey, mach bitte ein IT-Ticket: Tastatur im Büro 4.12 klemmt", TICKET,
     {"summary": "Tastatur im Büro 4.12 klemmt"}),
    ("Mein Laptop startet nicht mehr, bitte ein Ticket erstellen", TICKET,
     {"summary": "~Laptop startet nicht mehr"}),
    ("Create ticket: VPN keeps disconnecting", TICKET, {"summary": "VPN keeps disconnecting"}),
    ("Kannst du ein Ticket anlegen, dass der Beamer in Raum 3 kaputt ist?", TICKET,
     {"summary": "~Beamer in Raum 3 kaputt"}),
    # --- meeting.schedule --------------------------------------------------------------
    ("Plane ein Meeting mit Anna am Dienstag um 10 Uhr", MEETING,
     {"attendee": "Anna", "date": "Tuesday", "time": "10:00"}),
    ("Schedule a meeting with Bob tomorrow at 3pm", MEETING,
     {"attendee": "Bob", "date": "tomorrow", "time": "15:00"}),
    ("Könnten Sie bitte einen Termin mit Herrn Müller für Freitag 14:30 einplanen?", MEETING,
     {"attendee": "~Müller", "date": "Friday", "time": "14:30"}),
    ("Set up a call with Sarah on Monday at 9:15", MEETING,
     {"attendee": "Sarah", "date": "Monday", "time": "09:15"}),
    ("Mach bitte nen Termin mit Lisa morgen um 15 Uhr", MEETING,
     {"attendee": "Lisa", "date": "tomorrow", "time": "15:00"}),
    ("Book a meeting with the sales team next Tuesday at 11am", MEETING,
     {"attendee": "~sales team", "date": "Tuesday", "time": "11:00"}),
    ("Besprechung mit dem Vertrieb am 12.03. um 9 Uhr ansetzen", MEETING,
     {"attendee": "Vertrieb", "date": "03-12", "time": "09:00"}),
    ("Kannst du für Mittwoch 16 Uhr ein Meeting mit Tom und Jerry organisieren?", MEETING,
     {"attendee": "~Tom", "date": "Wednesday", "time": "16:00"}),
    ("Meeting with alice@example.com on 2025-03-14 at 10:30", MEETING,
     {"attendee": "alice@example.com", "date": "2025-03-14", "time": "10:30"}),
    ("Termin mit Frau Schmidt übermorgen 8:00 bitte", MEETING,
     {"attendee": "~Schmidt", "date": "day after tomorrow", "time": "08:00"}),
    ("Please arrange a meeting with Peter Parker on Thursday at 4 pm", MEETING,
     {"attendee": "Peter Parker", "date": "Thursday", "time": "16:00"}),
    ("Lade Anna für Donnerstag um 10:30 zu einem Meeting ein", MEETING,
     {"attendee": "Anna", "date": "Thursday", "time": "10:30"}),
    ("meeting mit anna morgen", MEETING, {"attendee": "anna", "date": "tomorrow", "time": ""}),
    ("Can you set up a meeting with Jane for Friday at 2pm?", MEETING,
     {"attendee": "Jane", "date": "Friday", "time": "14:00"}),
    ("Vereinbare einen Termin mit Herrn Klein am Montag um 9:30", MEETING,
     {"attendee": "~Klein", "date": "Monday", "time": "09:30"}),
    ("Ich brauche ein Meeting mit dem Marketing-Team morgen um 14 Uhr", MEETING,
     {"attendee": "Marketing-Team", "date": "tomorrow", "time": "14:00"}),
    ("Könnten Sie bitte einen Termin mit Frau Wagner für den 15. März um 11 Uhr einplanen?",
     MEETING, {"attendee": "~Wagner", "date": "03-15", "time": "11:00"}),
    # --- web.open ----------------------------------------------------------------------
    ("Öffne https://portal.example.com", WEB, {"url": "https://portal.example.com"}),
    ("Open portal.example.com", WEB, {"url": "https://portal.example.com"}),
    ("Kannst du bitte die Seite www.datev.de aufrufen?", WEB, {"url": "https://www.datev.de"}),
    ("Please navigate to https://intranet.firma.de/hr/urlaub", WEB,
     {"url": "https://intranet.firma.de/hr/urlaub"}),
    ("Geh mal auf example.org", WEB, {"url": "https://example.org"}),
    ("Browse to http://localhost:8080/admin", WEB, {"url": "http://localhost:8080/admin"}),
    ("Ruf bitte die Webseite shop.beispiel.de auf", WEB, {"url": "https://shop.beispiel.de"}),
    ("oeffne mal portal.example.com im Browser", WEB, {"url": "https://portal.example.com"}),
    ("Visit https://status.github.com and check it loads", WEB,
     {"url": "https://status.github.com"}),
    ("Zeig mir https://docs.python.org/3/", WEB, {"url": "https://docs.python.org/3/"}),
    ("Go to https://crm.example.com/login please", WEB, {"url": "https://crm.example.com/login"}),
    ("Könnten Sie die URL https://wiki.intern.example.com/start öffnen?", WEB,
     {"url": "https://wiki.intern.example.com/start"}),
    ("Bitte öffne die Seite intranet.example.com", WEB, {"url": "https://intranet.example.com"}),
    ("Navigiere zu https://example.com/dashboard", WEB, {"url": "https://example.com/dashboard"}),
]

NEGATIVES: list[str] = [
    "asdf qwer",
    "Wie ist das Wetter?",
    "Hallo, wie geht es dir?",
    "Thanks, that's all for today!",
    "What time is it?",
    "Ich habe gestern eine Mail bekommen",
    "Danke für die Rechnung!",
    "Öffne das Fenster",
    "Who won the football game last night?",
    "Mir ist langweilig",
    "Bitte ignoriere die letzte Nachricht",
    "The meeting was great, thanks",
    "Das Ticket ist erledigt, danke",
    "lorem ipsum dolor sit amet",
    "12345",
    "Open the door please",
    "Kaffee?",
    "Wie spät ist es in Tokio?",
    "Kannst du mir einen Witz erzählen?",
    "I love pizza",
    "Was ist die Hauptstadt von Frankreich?",
    "Bitte ruf mich zurück",
    "Das Meeting gestern war lang",
]


@pytest.fixture(scope="module")
def router() -> IntentRouter:
    catalogue = IntentCatalogue.from_yaml(CONFIG_DIR / "intents.yaml")
    return IntentRouter(catalogue, settings=RouterSettings(llm_provider="none"))


def test_corpus_covers_every_intent_ten_times(router: IntentRouter) -> None:
    counts = Counter(intent for _, intent, _ in CORPUS)
    assert set(counts) == set(router.catalogue.names)
    assert min(counts.values()) >= 10, counts
    assert len(NEGATIVES) >= 10


def _check_slot(name: str, got: str | None, expected: str) -> None:
    assert got is not None, f"slot {name} missing"
    if expected.startswith("~"):
        assert expected[1:].casefold() in got.casefold(), f"{name}: {got!r} lacks {expected!r}"
    else:
        assert got.casefold() == expected.casefold(), f"{name}: {got!r} != {expected!r}"


@pytest.mark.parametrize(("text", "intent", "slots"), CORPUS, ids=[c[0][:40] for c in CORPUS])
def test_corpus_routes(router: IntentRouter, text: str, intent: str, slots: dict[str, str]) -> None:
    result = router.route_rules(text)
    assert result.intent == intent, (result.reason, result.alternatives)
    assert result.source == "rules"
    assert result.confidence >= router.settings.min_confidence
    assert result.missing_slots == ()
    for name, expected in slots.items():
        _check_slot(name, result.slots.get(name), expected)
    assert result.plan, "a routed intent with all slots has a plan"


@pytest.mark.parametrize("text", NEGATIVES)
def test_negatives_do_not_match(router: IntentRouter, text: str) -> None:
    result = router.route_rules(text)
    assert result.intent is None, (result.confidence, result.reason)
    assert result.source == "none"
    assert result.plan == []
    assert result.confidence < router.settings.min_confidence
