"""The examples of Momentum's outbound_smtp_auth documentation, verbatim; tests share them."""

SEED_USER = "test@contoso.onmicrosoft.com"
SEED_TOKEN = "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"

# The first example, inside Momentum's usual module boilerplate.
SEED_LUA = """\
local mod = {}
function mod:outbound_smtp_auth_config(msg)
  --print('NOTICE: outbound_smtp_auth_config Lua hook called');
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_type', 'XOAUTH2')
  -- credential taken from example here:
  -- https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_user', 'test@contoso.onmicrosoft.com')
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_pass', 'EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA')
end
msys.registerModule("my_auth", mod)
"""

# The second example: three Domain stanzas.
SEED_CONF = """\
outbound_smtp_auth { }

Keep_Message_Dicts_In_Memory = true

Domain "messagesystems.com" {
  Outbound_SMTP_AUTH_Type = "LOGIN"
  Outbound_SMTP_AUTH_User = "msys"
  Outbound_SMTP_AUTH_Pass = "msys"
}

Domain "sparkpost.com" {
  Outbound_SMTP_AUTH_Type = "PLAIN"
  Outbound_SMTP_AUTH_user = "sparkpost"
  Outbound_SMTP_AUTH_pass = "sparkpost"
}

Domain "bird.com" {
  Outbound_SMTP_AUTH_Type = "XOAUTH2"
  Outbound_SMTP_AUTH_user = "test@contoso.onmicrosoft.com"
  Outbound_SMTP_AUTH_pass = "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"
}
"""
