-- ctinotify click-to-dial for macOS: tel: and callto: links ring your own
-- desk phone, which calls the number once you lift it (ctinotify watch --dial).
--
-- NOT TESTED on a Mac by the ctinotify tests (they run on Linux).  macOS hands
-- a URL only to an application bundle that declares its scheme, so:
-- 1. Edit the command below (where ctinotify.py is, your server and user).
-- 2. Script Editor: File, Export..., File Format: Application, e.g. as
--    "/Applications/ctinotify dial.app".
-- 3. Add to that app's Contents/Info.plist (inside the top <dict>), and give
--    CFBundleIdentifier a name of your own, e.g. org.example.ctinotify-dial:
--      <key>CFBundleURLTypes</key>
--      <array><dict>
--        <key>CFBundleURLName</key><string>Telephone numbers</string>
--        <key>CFBundleURLSchemes</key><array><string>tel</string><string>callto</string></array>
--      </dict></array>
-- 4. Open the app once (so Launch Services sees it), then make it the handler:
--    macOS has no setting for it; "duti -s org.example.ctinotify-dial tel" does
--    (duti from Homebrew), and so do some browsers when asked.
-- "quoted form of" quotes the URL for the shell: nothing in it runs as a command.

on open location theURL
	set command to "/usr/bin/python3 ~/ctinotify/ctinotify.py watch pbx.example.com --user alice --secret-file ~/.ctinotify-secret --dial " & quoted form of theURL & " 2>&1"
	try
		set outcome to do shell script command
		display notification (last paragraph of outcome) with title "ctinotify"
	on error message
		display notification message with title "ctinotify: not dialled"
	end try
end open location
