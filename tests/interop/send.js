// A sender of the interop matrix: nodemailer, as a Node app sends mail.
// Usage: node send.js PORT FROM USER PASSWORD FILE RCPT... (USER "" for no AUTH); exit 1 with the error.
const fs = require("fs");
const nodemailer = require("nodemailer");

const [port, from, user, password, file, ...to] = process.argv.slice(2);
const transport = nodemailer.createTransport({
  host: "127.0.0.1",
  port: Number(port),
  secure: false,
  auth: user ? { user, pass: password } : undefined,
});
transport
  .sendMail({ envelope: { from, to }, raw: fs.readFileSync(file) })
  .then((info) => console.log(info.response))
  .catch((error) => {
    console.error(`${error.responseCode || ""} ${error.message}`);
    process.exit(1);
  });
