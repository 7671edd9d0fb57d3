// A sender of the interop matrix: Jakarta Mail (Eclipse Angus Mail), as a Spring or Java EE app sends mail.
// Usage: java -cp ... Send PORT FROM USER PASSWORD FILE RCPT... (USER "" for no AUTH); exit 1 with the error.
import jakarta.mail.Address;
import jakarta.mail.MessagingException;
import jakarta.mail.Session;
import jakarta.mail.Transport;
import jakarta.mail.internet.InternetAddress;
import jakarta.mail.internet.MimeMessage;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;

public class Send {
  public static void main(String[] args) throws Exception {
    String port = args[0], from = args[1], user = args[2], password = args[3], file = args[4];
    Properties props = new Properties();
    props.put("mail.smtp.host", "127.0.0.1");
    props.put("mail.smtp.port", port);
    props.put("mail.smtp.auth", user.isEmpty() ? "false" : "true");
    props.put("mail.smtp.from", from);
    props.put("mail.smtp.localhost", "app.test");
    props.put("mail.smtp.timeout", "60000");
    props.put("mail.mime.allowutf8", "true"); // SMTPUTF8 for non-ASCII addresses, when offered
    Session session = Session.getInstance(props);
    MimeMessage message;
    try (InputStream in = Files.newInputStream(Path.of(file))) {
      message = new MimeMessage(session, in);
    }
    Address[] to = new Address[args.length - 5];
    for (int i = 5; i < args.length; i++) {
      to[i - 5] = new InternetAddress(args[i], false);
    }
    try (Transport transport = session.getTransport("smtp")) {
      if (user.isEmpty()) {
        transport.connect();
      } else {
        transport.connect(user, password);
      }
      transport.sendMessage(message, to);
    } catch (MessagingException error) {
      for (Exception e = error; e != null; ) {
        System.err.println(e);
        e = e instanceof MessagingException ? ((MessagingException) e).getNextException() : null;
      }
      System.exit(1);
    }
  }
}
