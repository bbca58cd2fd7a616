from twisted.application.service import ServiceMaker

estd = ServiceMaker(
    "estd", "estd.tap", "EST (RFC 7030) certificate enrollment server", "est"
)
