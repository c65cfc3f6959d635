from mitoseg.cli import main

raise SystemExit(main())
